"""Runs the stages in order over one run folder, skipping those whose inputs have not changed.

    questions ─> generate ─> label ─> extract (─> samples) ─> probe ─> wholemap ─> baselines (─> entropy) (─> attention) ─> cost
              ─> plot ─> report

``samples`` and ``entropy`` (truthmap/analyses/entropy.py) run with ``--also samples``, and always in a study
without gold answers, where the stages that need correctness labels (``labelled`` in the table) are skipped.

An optional analysis (``optional`` in the table: the whole map, cost, the entropy probe, attention) that
cannot run on this data raises :class:`~truthmap.errors.CannotRun`; a run of several stages then skips it
with one line on stderr, records why in summary.json ``skipped`` ({stage: reason}; the entry goes when the stage next
runs), removes its outputs of an earlier run, and goes on. Asked for alone (``truthmap entropy``) it is an error.

``STAGE_TABLE`` says, for every stage, the function that runs it, the run-folder files it reads (its
fingerprint, with its settings) and the files it writes — each file written by exactly one stage
(runfolder.py names them) — and whether it needs the model: ``workers`` (on Ray workers with ``--ray``,
otherwise in this process) or ``here`` (in this process). The model is loaded at most once, and only if
a stage that needs it has to run.
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import runfolder as rf
from .backend import Models
from .config import OUTSIDE, SETTINGS, Config, make_config
from .errors import CannotRun, TruthmapError
from .metrics import cell_summary, choose_cell, mean_over_seeds, read_results, read_run_results


@dataclass(frozen=True)
class StageRun:
    """What a stage's function is given."""

    config: Config
    run_dir: Path
    models: Models | None  # None for a stage that needs no model
    stamp: str  # the stage's fingerprint (settings + inputs)
    force: bool  # --force: recompute, keeping nothing of an earlier, interrupted run


@dataclass(frozen=True)
class Stage:
    """One row of the stage table."""

    name: str
    run: Callable[[StageRun], None]  # writes ``outputs`` (and summary.json fields)
    inputs: tuple[str, ...]  # run-folder files and folders it reads; with ``settings``, its fingerprint
    outputs: tuple[str, ...]  # the files it writes; no other stage writes them
    settings: Callable[[Config], dict]  # the settings its outputs depend on
    model: str | None = None  # None, "here" (this process) or "workers" (Ray workers with --ray)
    labelled: bool = False  # needs graded answers: skipped in a study without gold answers
    when: Callable[[Config, Path], bool] | None = None  # an optional stage runs only when this says so
    sources: Callable[[Config], list[Path]] | None = None  # files outside the run folder it reads
    optional: bool = False  # an analysis the rest does not need: skipped (CannotRun) in a labelled study


def _fields(*names: str) -> Callable[[Config], dict]:
    return lambda c: {name: getattr(c, name) for name in names}


def run_stage(stage: Stage, config: Config, run_dir: Path, models: Models | None = None, force: bool = False) -> bool:
    """Run ``stage`` unless it is current; record its fingerprint and time. True if it ran."""
    inputs = [run_dir / name for name in stage.inputs] + (stage.sources(config) if stage.sources else [])
    stamp = rf.fingerprint(stage.settings(config), inputs)
    if not force and rf.stage_is_current(run_dir, stage.name, stamp, [run_dir / name for name in stage.outputs]):
        return False
    with rf.stage(stage.name, rerun=True):  # until it finishes, the stage's old outputs are not current
        started = time.perf_counter()
        stage.run(StageRun(config, run_dir, models, stamp, force))
        seconds = time.perf_counter() - started
        rf.mark_stage_done(run_dir, stage.name, stamp, seconds)
        rf.update_summary(run_dir, stage_seconds={stage.name: round(seconds, 2)})
    return True


# ---------------------------------------------------------------- the stages

def _dataset_file(c: Config) -> list[Path]:
    """A local dataset file is an input: editing it makes the answers stale (TASK:PATH and --data-dir too)."""
    from .tasks import resolve

    _, source = resolve(c.dataset, c.data_dir)
    return [source.path] if source.kind == "file" else []


def _generate(s: StageRun) -> None:
    from .stages.generate import answers_one_line, context_length, run_generate
    from .tasks import answer_length

    c, run_dir = s.config, s.run_dir
    s.models.check()  # an unknown model fails before the questions are read (a hub dataset may be large)
    questions, vocabularies = _PRELOADED.pop(_question_settings(c), None) or _checked_questions(c)
    max_new_tokens = answer_length(questions["task"], c.max_new_tokens, c.protocol)
    rf.write_parquet(run_dir / rf.QUESTIONS, questions)
    rf.write_json(run_dir / rf.VOCABULARIES, vocabularies)
    lm = s.models.lm
    # finished chunks of an interrupted generation with the same settings and model are kept
    if s.force:  # --force: answer anew, not from saved chunks
        rf.remove(run_dir / rf.GENERATION_CHUNKS)
    chunks = rf.ChunkStore(run_dir / rf.GENERATION_CHUNKS, f"{s.stamp} {lm.revision}")
    # one pass: the states of every site and the token scores are read while the model answers
    capture_sites = c.sites if c.extract == "onepass" else None
    table = run_generate(lm, questions, template=c.prompt_template, max_new_tokens=max_new_tokens,
                         batch_size=c.batch_size, progress=c.progress, chunks=chunks,
                         long_prompts=c.long_prompts, protocol=c.protocol, capture_sites=capture_sites)
    rf.write_parquet(run_dir / rf.GENERATIONS, table)
    rf.update_summary(run_dir, model=c.model, model_revision=lm.revision, dataset=c.dataset,
                      tasks=sorted(set(questions["task"])), source_rows=questions.attrs["source_rows"],
                      n_layers=lm.n_layers, hidden_size=lm.hidden_size,
                      generation={"protocol": c.protocol, "max_new_tokens": max_new_tokens,
                                  "answers_end_at_line_break": answers_one_line(lm.tokenizer)},
                      long_prompts={"mode": c.long_prompts, "context_tokens": context_length(lm),
                                    "truncated": int((table["prompt_cut"] > 0).sum()),
                                    "skipped": len(questions) - len(table)})


def _question_settings(c: Config) -> tuple:
    """The settings that decide the questions and their checks (the key of what preflight read)."""
    return tuple(getattr(c, name) for name in ("dataset", "limit", "question_column", "answer_column", "data_dir",
                                               "on_bad_row", "protocol", "test_fraction", "validation_fraction",
                                               "min_per_class", "samples"))


def _checked_questions(c: Config) -> tuple[pd.DataFrame, dict]:
    """(questions, vocabularies) of the study, its modes announced and its size checked (preflight.py)."""
    from .data import load_questions
    from .preflight import check_questions

    questions, vocabularies = load_questions(c.dataset, c.limit, 0, c.question_column, c.answer_column,
                                             c.data_dir, c.on_bad_row, c.protocol)
    check_questions(questions, c)
    return questions, vocabularies


# the questions read and checked before a new run folder was made, used once by generate (same settings)
_PRELOADED: dict[tuple, tuple[pd.DataFrame, dict]] = {}


def preflight(config: Config) -> None:
    """Before a new run folder is made: the model is found, the questions read, modes announced and the
    size checked — a refused input leaves no folder behind."""
    Models(config, on_workers=True).check()
    _PRELOADED[_question_settings(config)] = _checked_questions(config)


LABEL_FREE_NOTE = ("the questions have no gold answers: no answer is graded and no correctness AUC exists; "
                   "heatmap_entropy shows how well semantic-entropy probes agree with semantic entropy")


def judge_model(c: Config, models):
    """The lenient grader's judge (``--judge-grader``, or ``--grader lenient``): the extractor model, else the
    studied model; None when not asked. It runs in this process (one forward pass per answer)."""
    if not (c.judge_grader or c.grader == "lenient"):
        return None
    if models.on_workers and c.ray and c.extractor_model in (None, "none", c.model):
        raise TruthmapError("--judge-grader with --ray: the judge runs in this process; name it with "
                            "--extractor-model (a model loaded here), or leave the judge out")
    return models.extractor or models.lm


def _label(s: StageRun) -> None:
    from .splits import make_splits, population
    from .stages.label import check_labels, exact_answer_summary, has_labels, label_answers

    c, run_dir = s.config, s.run_dir
    questions = rf.read_parquet(run_dir / rf.QUESTIONS)
    generations = rf.read_parquet(run_dir / rf.GENERATIONS)
    vocabularies = rf.read_json(run_dir / rf.VOCABULARIES)
    answers = label_answers(questions, generations, vocabularies, s.models.lm.tokenizer, c.positions,
                            extractor=s.models.extractor, judge=judge_model(c, s.models), batch_size=c.batch_size,
                            progress=c.progress, exact_answer=c.exact_answer, grader=c.grader, protocol=c.protocol)
    judged = answers.attrs.get("judge")  # the lenient grader's calls and forward tokens; None: not asked
    judged = {**judged, "model": c.extractor_model or c.model} if judged else None
    labelled = has_labels(answers)
    # a label-free study is split by its groups alone (there are no classes to stratify)
    left_out = population(answers, c.positions) if c.population == "common" else None
    splits = make_splits(answers if labelled else answers.assign(correct=True), c.seeds, c.test_fraction,
                         c.validation_fraction, left_out, c.population)
    answers["split"] = ""  # "": outside the study's population
    for part, members in splits["seeds"][str(c.seeds[0])].items():
        answers.loc[answers["id"].isin(set(members)), "split"] = part
    rf.write_parquet(run_dir / rf.ANSWERS, answers)
    rf.write_json(run_dir / rf.SPLITS, splits)
    if labelled:
        from .preflight import check_population

        check_population(splits, len(answers))  # said before the extraction and the probes
    if not labelled:
        rf.update_summary(run_dir, n=int(len(answers)), labels="none", no_correctness_auc=LABEL_FREE_NOTE,
                          population=population_summary(splits, len(answers)))
        return
    rf.update_summary(run_dir, **answer_summary(answers), population=population_summary(splits, len(answers)),
                      labels="gold", exact_answer=exact_answer_summary(answers, c.exact_answer), grader_judge=judged)
    check_labels(answers, str(run_dir / rf.ANSWERS))


def _extract(s: StageRun) -> None:
    from .stages.capture import CaptureReader
    from .stages.extract import run_extract

    c, run_dir = s.config, s.run_dir
    # shards of an interrupted extraction with the same inputs are kept; others are stale
    marker = run_dir / rf.ACTIVATIONS_FINGERPRINT
    store = run_dir / rf.ACTIVATIONS
    if s.force or (store.exists() and (not rf.trusted(marker) or marker.read_text() != s.stamp)):
        rf.remove(store)
    if not rf.trusted(marker):
        rf.write_text(marker, s.stamp)
    answers = rf.read_parquet(run_dir / rf.ANSWERS)
    generations = rf.read_parquet(run_dir / rf.GENERATIONS)
    capture = CaptureReader(run_dir, generations) if c.extract == "onepass" else None
    run_extract(s.models.lm, answers, generations, c.positions, c.sites, run_dir,
                batch_size=c.batch_size or 16, progress=c.progress, capture=capture)
    if capture is not None:
        rf.update_summary(run_dir, extract={"mode": c.extract, "captured": len(capture.where),
                                            "read_again": capture.read_again})


def wants_samples(config: Config, run_dir: Path) -> bool:
    """Sampling runs with ``--also samples``, and always for a study without gold answers."""
    from .stages.label import has_labels

    return "samples" in config.also or not has_labels(rf.read_parquet(run_dir / rf.ANSWERS))


def _samples(s: StageRun) -> None:
    """N sampled answers per question and their sampling scores (semantic entropy …; analyses/entropy.py)."""
    from .analyses.entropy import run_sampling

    c, models = s.config, s.models
    judge = (models.extractor or models.lm) if c.judge_equivalence else None
    info = run_sampling(models.lm, s.run_dir, n=c.samples, temperature=c.sample_temperature, seed=0,
                        judge_lm=judge, grader_lm=judge_model(c, models), batch_size=c.batch_size,
                        progress=c.progress)
    rf.update_summary(s.run_dir, sampling=info)


def _entropy_column(c: Config) -> str:
    return "semantic_entropy_judged" if c.judge_equivalence else "semantic_entropy"


def _entropy(s: StageRun) -> None:
    """Semantic-entropy probes for every cell and their heatmap."""
    from .analyses import entropy as se
    from .models import resolve_device

    c, run_dir = s.config, s.run_dir
    device = resolve_device(c.device) if c.device_map is None else "cpu"
    results, scores, details = se.run_entropy_probe(run_dir, c.sites, column=_entropy_column(c), C=c.C, n_boot=c.bootstrap,
                                                    device=device, progress=c.progress, min_per_class=c.min_per_class)
    rf.write_csv(run_dir / rf.ENTROPY_RESULTS, results)
    rf.write_parquet(run_dir / rf.ENTROPY_SCORES, scores)
    n = len(rf.read_parquet(run_dir / rf.ANSWERS).query("split != ''"))
    se.plot_entropy_heatmap(results, c.positions, run_dir, model=_short_model(c.model), dataset=c.dataset, n=n)
    rf.update_summary(run_dir, entropy_probe=se.entropy_summary(results, details))


def _probe(s: StageRun) -> None:
    from .models import resolve_device
    from .stages.probe import run_probe
    from .stages.verdict import study_verdict

    c, run_dir = s.config, s.run_dir
    device = resolve_device(c.device) if c.device_map is None else "cpu"
    results, scores = run_probe(run_dir, c.sites, C=c.C, n_boot=c.bootstrap, device=device, progress=c.progress,
                                min_per_class=c.min_per_class, reference=c.protocol == "reference")
    rf.write_csv(run_dir / rf.PROBE_RESULTS, results)  # the probes' rows; the baselines have their own file
    rf.write_parquet(run_dir / rf.PROBE_SCORES, scores)
    rf.update_summary(run_dir, **best_cells(mean_over_seeds(results)))
    # the probe cells' part of the verdict; the baselines stage adds the baselines and controls
    verdict = study_verdict(results, scores, rf.read_parquet(run_dir / rf.ANSWERS), rf.read_splits(run_dir / rf.SPLITS),
                            c.bootstrap)
    rf.update_summary(run_dir, verdict=verdict)


def _wholemap(s: StageRun) -> None:
    """The whole map as one probe and the per-cell permutation null (analyses/wholemap.py)."""
    from .analyses.wholemap import run_wholemap
    from .models import resolve_device

    c, run_dir = s.config, s.run_dir
    device = resolve_device(c.device) if c.device_map is None else "cpu"
    results, scores, null, summary = run_wholemap(run_dir, c.sites, C=c.C, n_boot=c.bootstrap,
                                                  n_permutations=c.permutations, device=device, progress=c.progress)
    rf.write_csv(run_dir / rf.WHOLEMAP_RESULTS, results)
    rf.write_parquet(run_dir / rf.WHOLEMAP_SCORES, scores)
    rf.write_csv(run_dir / rf.CELL_NULL, null)
    rf.update_summary(run_dir, **summary)


def best_cells(means: pd.DataFrame) -> dict:
    """summary.json's choices among probe cells: every "best" is chosen on validation AUCs."""
    top = means.sort_values("val_auc", ascending=False).head(5)
    return {
        "best_cell": cell_summary(choose_cell(means)),  # chosen on validation; its test AUC is free of the choice
        "top_cells": [cell_summary(row) for row in top.to_dict("records")],
        "best_within_cell": cell_summary(choose_cell(means, "within_val_auc")),
        # what choosing on test would report (optimistic: the best of hundreds on the answers that score it)
        "best_on_test": cell_summary(choose_cell(means, "auc")),
    }


def population_summary(splits: dict, n_answers: int) -> dict:
    """summary.json's account of the answers studied: the rule, how many, who was left out and why."""
    reasons = pd.Series(list(splits["left_out"].values()), dtype=object)
    return {"rule": splits["population"], "n": splits["n"], "n_answers": n_answers,
            "left_out": int(len(reasons)), "left_out_reasons": reasons.value_counts().to_dict(),
            "fractions": {"train": round(1 - splits["test_fraction"] - splits["validation_fraction"], 4),
                          "validation": splits["validation_fraction"], "test": splits["test_fraction"]},
            "groups": splits["groups"]}


def _baselines(s: StageRun) -> None:
    """Token-probability, entropy, p(True) and family baselines on the probes' test splits (stages/baselines.py)."""
    from .stages import baselines as bl
    from .analyses.entropy import with_sampling_scores

    config, run_dir = s.config, s.run_dir
    answers = rf.read_parquet(run_dir / rf.ANSWERS)
    scores = bl.compute_scores(s.models.lm, answers, rf.read_parquet(run_dir / rf.GENERATIONS), config.progress,
                               one_pass=config.extract == "onepass", p_true_of=config.p_true)
    rf.update_summary(run_dir, baseline_seconds=scores.attrs.get("seconds"),
                      baseline_forward_tokens=scores.attrs.get("forward_tokens"))
    scores = with_sampling_scores(run_dir, scores)  # semantic entropy … when the run drew samples
    rf.write_parquet(run_dir / rf.BASELINE_SCORES, scores)
    title = f"{_short_model(config.model)} · {config.dataset} · baselines beside the best probe"
    rf.update_summary(run_dir, **bl.finish_baselines(run_dir, scores, n_boot=config.bootstrap, title=title))


def _cost(s: StageRun) -> None:
    """Every method's test AUC against its extra cost beyond answering (analyses/cost.py)."""
    from .analyses.cost import cost_summary, cost_table, plot_cost

    table = cost_table(s.run_dir)
    rf.write_csv(s.run_dir / rf.COST, table)
    title = f"{_short_model(s.config.model)} · {s.config.dataset} · test AUC against extra cost beyond answering"
    plot_cost(table, s.run_dir / rf.COST_FIGURE, title)
    rf.update_summary(s.run_dir, cost=cost_summary(table))


def _attention(s: StageRun) -> None:
    """The attention heatmap (analyses/attention.py)."""
    from .analyses.attention import run_attention

    title = f"{_short_model(s.config.model)} · {s.config.dataset} · attention of the last generated token"
    run_attention(s.models.lm, s.run_dir, positions=s.config.positions, title=title)


def _plot(s: StageRun) -> None:
    from .analyses.wholemap import cells_below_null
    from .stages.plot import VIEWS, left_out_note, plot_heatmap

    config, run_dir = s.config, s.run_dir
    results = read_run_results(run_dir, baselines=False)
    if (run_dir / rf.BASELINE_RESULTS).exists():  # the controls among the baselines' rows set the hatching
        results = pd.concat([results, read_results(run_dir / rf.BASELINE_RESULTS)], ignore_index=True)
    n = len(rf.read_parquet(run_dir / rf.ANSWERS).query("split != ''"))  # the population
    hatched = cells_below_null(run_dir)  # None without the per-cell null (--permutations 0)
    left_out = left_out_note(rf.read_splits(run_dir / rf.SPLITS).get("left_out") or {})  # who else, and why
    for view in VIEWS:
        plot_heatmap(results, config.positions, run_dir / view, model=_short_model(config.model),
                     dataset=config.dataset, n=n, view=view, left_out=left_out,
                     hatched=hatched if view == "heatmap" else None)


def _report(s: StageRun) -> None:
    from .stages.report import write_report

    write_report([s.run_dir], s.run_dir / rf.REPORT)


STAGE_TABLE: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("generate", _generate, inputs=(), outputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.GENERATIONS),
          settings=_fields("model", "dataset", "limit", "protocol", "prompt_template", "max_new_tokens", "dtype",
                           "question_column", "answer_column", "long_prompts", "data_dir", "on_bad_row"),
          model="workers", sources=_dataset_file),
    Stage("label", _label, inputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.GENERATIONS), outputs=(rf.ANSWERS, rf.SPLITS),
          settings=_fields("positions", "extractor_model", "seeds", "test_fraction", "validation_fraction",
                           "population", "exact_answer", "grader", "judge_grader", "protocol"),
          model="workers"),
    Stage("extract", _extract, inputs=(rf.ANSWERS, rf.GENERATIONS), outputs=(rf.ACTIVATIONS_INDEX,),
          settings=_fields("sites", "dtype", "extract"), model="workers"),
    Stage("samples", _samples, inputs=(rf.QUESTIONS, rf.VOCABULARIES, rf.ANSWERS, rf.GENERATIONS, rf.ACTIVATIONS_INDEX),
          outputs=(rf.RESAMPLES, rf.SAMPLING_SCORES),
          settings=lambda c: {"samples": c.samples, "temperature": c.sample_temperature, "judge": c.judge_equivalence,
                              "judge_model": c.extractor_model if c.judge_equivalence else None,
                              "max_new_tokens": c.max_new_tokens, "model": c.model, "dtype": c.dtype,
                              "grader": c.grader, "judge_grader": c.judge_grader},
          model="here", when=wants_samples),
    Stage("probe", _probe, inputs=(rf.ANSWERS, rf.SPLITS, rf.ACTIVATIONS), outputs=(rf.PROBE_RESULTS, rf.PROBE_SCORES),
          settings=_fields("C", "bootstrap", "sites", "min_per_class", "protocol"), labelled=True),
    Stage("wholemap", _wholemap, inputs=(rf.ANSWERS, rf.SPLITS, rf.ACTIVATIONS, rf.PROBE_RESULTS, rf.PROBE_SCORES),
          outputs=(rf.WHOLEMAP_RESULTS, rf.WHOLEMAP_SCORES, rf.CELL_NULL),
          settings=_fields("C", "bootstrap", "sites", "permutations"), labelled=True, optional=True),
    Stage("baselines", _baselines,
          inputs=(rf.ANSWERS, rf.GENERATIONS, rf.SPLITS, rf.PROBE_RESULTS, rf.PROBE_SCORES, rf.SAMPLING_SCORES),
          outputs=(rf.BASELINE_SCORES, rf.BASELINE_RESULTS, rf.FAMILY_RESULTS, rf.BASELINES_FIGURE),
          settings=_fields("bootstrap", "extract", "p_true"), model="here", labelled=True),
    Stage("entropy", _entropy, inputs=(rf.ANSWERS, rf.SPLITS, rf.ACTIVATIONS, rf.SAMPLING_SCORES),
          outputs=(rf.ENTROPY_RESULTS, rf.ENTROPY_SCORES, *rf.figures(rf.ENTROPY_FIGURE)),
          settings=lambda c: {"C": c.C, "bootstrap": c.bootstrap, "sites": c.sites, "column": _entropy_column(c),
                              "positions": c.positions, "min_per_class": c.min_per_class},
          when=lambda c, run_dir: (run_dir / rf.SAMPLING_SCORES).exists(), optional=True),
    Stage("attention", _attention, inputs=(rf.ANSWERS, rf.GENERATIONS),
          outputs=(rf.ATTENTION, *rf.figures(rf.ATTENTION_FIGURE)), settings=_fields("positions"), model="here",
          labelled=True, when=lambda c, run_dir: "attention" in c.also, optional=True),
    # summary.json's timings and token counts are read, not fingerprinted (every stage rewrites it)
    Stage("cost", _cost, inputs=(rf.ANSWERS, rf.GENERATIONS, rf.PROBE_RESULTS, rf.BASELINE_RESULTS,
                                 rf.WHOLEMAP_RESULTS, rf.RESAMPLES),
          outputs=(rf.COST, rf.COST_FIGURE), settings=lambda c: {}, labelled=True, optional=True),
    Stage("plot", _plot, inputs=(rf.PROBE_RESULTS, rf.BASELINE_RESULTS, rf.ANSWERS, rf.SPLITS, rf.CELL_NULL),
          outputs=tuple(name for view in rf.HEATMAPS for name in rf.figures(view)), settings=_fields("positions"),
          labelled=True),
    # summary.json is not an input: every stage rewrites it, so the report would never be current
    Stage("report", _report,
          inputs=(rf.ANSWERS, rf.SPLITS, rf.PROBE_RESULTS, rf.PROBE_SCORES, rf.BASELINE_RESULTS, rf.ENTROPY_RESULTS,
                  rf.WHOLEMAP_RESULTS),
          outputs=(rf.REPORT,), settings=lambda c: {}, labelled=True),
)}
STAGES = tuple(STAGE_TABLE)
MODEL_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.model)  # stages that may need the model
LABELLED_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.labelled)  # need graded answers
RAY_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.model == "workers")  # on Ray with --ray


def _short_model(model: str) -> str:
    return model.replace("embedded:", "").split("::")[-1]


def answer_summary(answers: pd.DataFrame) -> dict:
    """Model accuracy and valid-exact-answer rates, overall and per family."""
    wrong = answers[~answers["correct"]]
    per_family = {}
    for family, group in answers.groupby("family", sort=True):
        wrong_group = group[~group["correct"]]
        per_family[family] = {
            "n": int(len(group)),
            "accuracy": round(float(group["correct"].mean()), 4),
            "valid_exact_answer_rate": round(float(group["exact_answer_valid"].mean()), 4),
            "valid_exact_answer_rate_wrong": round(float(wrong_group["exact_answer_valid"].mean()), 4)
            if len(wrong_group) else None,
        }
    return {
        "n": int(len(answers)),
        "accuracy": round(float(answers["correct"].mean()), 4),
        "valid_exact_answer_rate": round(float(answers["exact_answer_valid"].mean()), 4),
        "valid_exact_answer_rate_wrong": round(float(wrong["exact_answer_valid"].mean()), 4) if len(wrong) else None,
        "invalid_exact_answer_reasons": answers.loc[~answers["exact_answer_valid"], "exact_answer_reason"]
        .value_counts().to_dict(),
        "families": per_family,
    }


def versions() -> dict:
    import pyarrow
    import sklearn
    import torch
    import transformers

    from .constants import __version__

    return {"python": platform.python_version(), "truthmap": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "pyarrow": pyarrow.__version__, "platform": platform.platform(),
            # CPU results depend on the thread count (it changes the order of float sums)
            "torch_threads": torch.get_num_threads()}


def run_stages(config: Config, stages: tuple[str, ...] = STAGES, force: bool = False,
               given: frozenset | None = None) -> Path:
    """Run ``stages`` of the study described by ``config``; return the run folder.

    ``given``: the settings the user gave (command line): the others are continued from the folder's
    saved config.json, read only once the folder is locked and checked, and never those of
    TRUST_SETTINGS (see :func:`continue_config`). None: ``config`` is used as it is.
    """
    run_dir = config.run_dir()
    try:
        rf.check_run_folder(run_dir)  # a folder that is not a run folder is the first thing said
        if "generate" in stages and not any((run_dir / name).exists() for name in (rf.MANIFEST, rf.CONFIG)):
            preflight(config)  # a new run: what can be refused is refused before the folder is made
        with rf.open_run(run_dir) as notices:  # one writer; damaged files are found, named and recomputed
            for notice in notices:
                print(f"truthmap: {rf.sanitise(notice, 1000)}", file=sys.stderr)
            if given is not None:
                config = continue_config(config, run_dir, given, stages)
            _run_stages(config, run_dir, stages, force)
    finally:
        _PRELOADED.clear()
    return run_dir


# settings that decide what code runs and where: only ever from the command line or --config FILE
TRUST_SETTINGS = ("model", "trust_remote_code", "ray", "device_map", "extractor_model")
# settings naming what a stage reads from outside the run folder (the schema's ``outside``): never continued
_NOT_CONTINUED = tuple(dict.fromkeys(TRUST_SETTINGS + OUTSIDE + ("progress",)))


def saved_config(run_dir: Path) -> dict:
    """The run folder's config.json if the manifest vouches for it (call inside open_run), else {}."""
    path = Path(run_dir) / rf.CONFIG
    if not rf.trusted(path):
        return {}
    try:
        saved = rf.read_json(path)
    except TruthmapError as err:
        print(f"truthmap: {err}; its settings are not continued", file=sys.stderr)
        return {}
    return saved if isinstance(saved, dict) else {}


def continue_config(config: Config, run_dir: Path, given: frozenset, stages: tuple[str, ...]) -> Config:
    """``config`` with the settings the user did not give taken from the run's saved config.json.

    Saved settings never choose what is read or run: those naming something outside the folder (the
    model, the dataset, its data folder, the extractor, a Ray cluster) and those of TRUST_SETTINGS are
    never taken from the folder. A model or dataset other than the run's is refused unless given where a
    stage would read it (a stage that does not only names the run's model and dataset in its titles); a
    trust setting that differs is said on stderr. The continued values are checked by the schema: a bad
    one is a one-line error naming config.json and the setting.
    """
    saved = saved_config(run_dir)
    if not saved:
        return config
    values = config.to_dict()
    continued = {k: v for k, v in saved.items() if k in SETTINGS and k not in given and k not in _NOT_CONTINUED}
    values.update(continued)
    reads = {"model": bool(set(stages) & set(MODEL_STAGES)), "dataset": "generate" in stages,
             "data_dir": "generate" in stages and "dataset" not in given}  # a dataset given anew: its folder too
    for name, needed in reads.items():
        was = saved.get(name)
        if name in given or not isinstance(was, str) or was == values[name]:
            continue  # (a saved value of another type is the schema's to refuse, below, if it were continued)
        if needed:
            flag = "--" + name.replace("_", "-")
            raise TruthmapError(f"{run_dir}: this run had {name} {rf.sanitise(repr(was), 200)}; give {flag} "
                                f"{rf.sanitise(str(was), 200)} to continue it (a {name.replace('_', ' ')} is never "
                                f"taken from a run folder)")
        if name != "data_dir":
            values[name] = was  # only named in titles: no stage here reads it
    extractor = saved.get("extractor_model")
    if "extractor_model" not in given and extractor in ("none", values["model"]):
        values["extractor_model"] = extractor  # no extractor, or the studied model: nothing more is loaded
    for name in TRUST_SETTINGS[1:]:
        if name == "ray" and not set(stages) & set(RAY_STAGES):
            continue  # the other stages, and the analyses, run the model in this process
        if name in saved and saved[name] != values[name] and name not in given:
            print(f"truthmap: {run_dir / rf.CONFIG}: this run had {name} = {rf.sanitise(repr(saved[name]), 80)}; "
                  f"not taken from the folder (now {values[name]!r}; give it on the command line or in --config)",
                  file=sys.stderr)
    source = str(run_dir / rf.CONFIG)
    try:
        return make_config(values, source, {name: "the command line" for name in given})
    except TruthmapError as err:
        if str(err).startswith(source):
            raise TruthmapError(f"{err}; give the setting on the command line or rerun the run") from None
        raise


def _run_stages(config: Config, run_dir: Path, stages: tuple[str, ...], force: bool) -> None:
    saved = saved_config(run_dir)
    if saved and "generate" not in stages and saved.get("model") != config.model:
        raise TruthmapError(f"{run_dir}: this run studied model '{rf.sanitise(saved.get('model'))}', not '{config.model}'")
    rf.write_json(run_dir / rf.CONFIG, config.to_dict())
    rf.update_summary(run_dir, versions=versions(), config=config.to_dict())
    started = time.perf_counter()
    workers = Models(config, on_workers=True)  # on Ray workers with --ray (generate, label, extract)
    # with Ray, the other model stages load the model here, in the driver (loaded only if they run)
    here = Models(config) if config.ray else workers
    try:
        for name in stages:
            stage = STAGE_TABLE[name]
            if stage.labelled and not _labelled(run_dir):
                continue  # a label-free study: no correctness to probe, score or draw (summary.json says so)
            if stage.when is not None and not stage.when(config, run_dir):
                continue  # an optional stage that was not asked for
            try:
                run_stage(stage, config, run_dir, {"workers": workers, "here": here}.get(stage.model), force)
            except CannotRun as err:
                # a label-free study has nothing but the entropy probe: there it is the study, not an extra
                if not (stage.optional and len(stages) > 1 and _labelled(run_dir)):
                    raise
                skip_stage(stage, run_dir, str(err))
            else:
                note_skipped(run_dir, name, None)
    finally:
        workers.close()
        here.close()
    rf.update_summary(run_dir, wall_seconds=round(time.perf_counter() - started, 2))


def skip_stage(stage: Stage, run_dir: Path, reason: str) -> None:
    """Leave out an optional analysis that cannot run on this data: say why (stderr and summary.json
    ``skipped``) and remove its outputs of an earlier run, which no longer describe this one."""
    print(f"truthmap: {stage.name} skipped: {rf.sanitise(reason, 1000)}", file=sys.stderr)
    for name in stage.outputs:
        if rf.trusted(run_dir / name):
            rf.remove(run_dir / name)
    done = rf.read_json(run_dir / rf.STAGES, default={}) if rf.trusted(run_dir / rf.STAGES) else {}
    entry = done.get(stage.name) if isinstance(done, dict) else None
    stale = entry.get("summary") if isinstance(entry, dict) else None  # its summary fields of that earlier run
    rf.forget_stage(run_dir, stage.name)
    note_skipped(run_dir, stage.name, reason, drop=tuple(stale) if isinstance(stale, dict) else ())


def note_skipped(run_dir: Path, name: str, reason: str | None, drop: tuple[str, ...] = ()) -> None:
    """Set (or, with None, clear) summary.json ``skipped[name]``; remove the summary fields ``drop``."""
    path = run_dir / rf.SUMMARY
    summary = rf.read_json_object(path, default={}) if rf.trusted(path) else {}
    skipped = summary.get("skipped") if isinstance(summary.get("skipped"), dict) else {}
    if reason is None and name not in skipped:
        return
    if reason is None:
        del skipped[name]
    else:
        skipped[name] = reason
    summary["skipped"] = skipped
    for key in drop:
        summary.pop(key, None)
    rf.write_json(path, summary)


def _labelled(run_dir: Path) -> bool:
    """False only for a run whose answers exist and carry no gold labels."""
    from .stages.label import has_labels

    path = run_dir / rf.ANSWERS
    return not path.exists() or has_labels(rf.read_parquet(path))

