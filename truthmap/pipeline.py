"""Runs the stages in order over one run folder, skipping those whose inputs have not changed.

    questions ─> generate ─> label ─> extract (─> samples) ─> probe ─> baselines (─> entropy) (─> attention)
              ─> plot ─> report

``samples`` and ``entropy`` (truthmap/entropy.py) run with ``--also samples``, and always in a study
without gold answers, where the stages that need correctness labels (``LABELLED_STAGES``) are skipped.

Each ``stage_*`` function reads the run folder and writes its own outputs (runfolder.py names them);
the model is loaded at most once, and only if a stage that needs it has to run.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import runfolder as rf
from .config import Config
from .errors import TruthmapError
from .probe import read_results

STAGES = ("generate", "label", "extract", "samples", "probe", "baselines", "entropy", "attention", "plot", "report")
MODEL_STAGES = ("generate", "label", "extract", "samples", "baselines", "attention")  # stages that may need the model
LABELLED_STAGES = ("probe", "baselines", "attention", "plot", "report")  # need graded answers (correctness)
RAY_STAGES = ("generate", "label", "extract")  # their model work runs on Ray workers with --ray (distributed.py)


class _ModelHolder:
    """Loads the studied model (and the extractor model) on first use."""

    def __init__(self, config: Config):
        self.config, self._lm, self._extractor = config, None, None

    @property
    def lm(self):
        if self._lm is None:
            from .models import load_model

            c = self.config
            if c.ray:  # the model lives on Ray workers; here only its tokenizer and config (distributed.py)
                from .distributed import start_workers

                self._lm = start_workers(c)
            else:
                self._lm = load_model(c.model, c.dtype, c.device, c.device_map, c.trust_remote_code)
        return self._lm

    def close(self) -> None:
        """Stop the Ray workers, if any were started."""
        workers = getattr(self._lm, "workers", None)
        if workers is not None:
            workers.close()

    @property
    def extractor(self):
        name = self.config.extractor_model
        if name == "none":
            return None
        if name is None or name == self.config.model:
            return self.lm
        if self._extractor is None:
            from .models import load_model

            c = self.config
            self._extractor = load_model(name, c.dtype, c.device, None, c.trust_remote_code)
        return self._extractor


def _run_stage(run_dir: Path, name: str, settings: dict, inputs: list[Path], outputs: list[Path], work,
               force: bool = False) -> bool:
    """Run ``work()`` unless the stage is current; record its fingerprint and time. True if it ran."""
    stamp = rf.fingerprint(settings, inputs)
    if not force and rf.stage_is_current(run_dir, name, stamp, outputs):
        return False
    with rf.stage(name, rerun=True):  # until it finishes, the stage's old outputs are not current
        started = time.perf_counter()
        work()
        seconds = time.perf_counter() - started
        rf.mark_stage_done(run_dir, name, stamp, seconds)
        rf.update_summary(run_dir, stage_seconds={name: round(seconds, 2)})
    return True


def stage_generate(config: Config, run_dir: Path, models: _ModelHolder, force: bool = False) -> bool:
    from .data import load_questions
    from .generate import answers_one_line, context_length, run_generate
    from .tasks import answer_length, resolve

    c = config
    settings = {k: getattr(c, k) for k in ("model", "dataset", "limit", "protocol", "prompt_template",
                                           "max_new_tokens", "dtype", "question_column", "answer_column",
                                           "long_prompts", "data_dir", "on_bad_row")}
    # a local dataset file is an input: editing it makes the answers stale (TASK:PATH and --data-dir too)
    _, source = resolve(c.dataset, c.data_dir)
    inputs = [source.path] if source.kind == "file" else []
    stamp = rf.fingerprint(settings, inputs)

    def work():
        questions, vocabularies = load_questions(c.dataset, c.limit, 0, c.question_column, c.answer_column,
                                                 c.data_dir, c.on_bad_row, c.protocol)
        max_new_tokens = answer_length(questions["task"], c.max_new_tokens, c.protocol)
        rf.write_parquet(run_dir / rf.QUESTIONS, questions)
        rf.write_json(run_dir / rf.VOCABULARIES, vocabularies)
        lm = models.lm
        # finished chunks of an interrupted generation with the same settings and model are kept
        if force:  # --force: answer anew, not from saved chunks
            rf.remove(run_dir / rf.GENERATION_CHUNKS)
        chunks = rf.ChunkStore(run_dir / rf.GENERATION_CHUNKS, f"{stamp} {lm.revision}")
        # one pass: the states of every site and the token scores are read while the model answers
        capture_sites = c.sites if c.extract == "onepass" else None
        table = run_generate(lm, questions, c.prompt_template, max_new_tokens, c.batch_size, c.progress,
                             chunks=chunks, long_prompts=c.long_prompts, protocol=c.protocol,
                             capture_sites=capture_sites)
        rf.write_parquet(run_dir / rf.GENERATIONS, table)
        rf.update_summary(run_dir, model=c.model, model_revision=lm.revision, dataset=c.dataset,
                          tasks=sorted(set(questions["task"])), source_rows=questions.attrs["source_rows"],
                          n_layers=lm.n_layers, hidden_size=lm.hidden_size,
                          generation={"protocol": c.protocol, "max_new_tokens": max_new_tokens,
                                      "answers_end_at_line_break": answers_one_line(lm.tokenizer)},
                          long_prompts={"mode": c.long_prompts, "context_tokens": context_length(lm),
                                        "truncated": int((table["prompt_cut"] > 0).sum()),
                                        "skipped": len(questions) - len(table)})

    outputs = [run_dir / rf.QUESTIONS, run_dir / rf.VOCABULARIES, run_dir / rf.GENERATIONS]
    return _run_stage(run_dir, "generate", settings, inputs, outputs, work, force)


LABEL_FREE_NOTE = ("the questions have no gold answers: no answer is graded and no correctness AUC exists; "
                   "heatmap_entropy shows how well semantic-entropy probes agree with semantic entropy")


def stage_label(config: Config, run_dir: Path, models: _ModelHolder, force: bool = False) -> bool:
    from .entropy import has_labels
    from .label import check_labels, label_answers, make_splits

    c = config
    settings = {"positions": c.positions, "extractor_model": c.extractor_model, "seeds": c.seeds,
                "test_fraction": c.test_fraction, "validation_fraction": c.validation_fraction,
                "population": c.population}
    inputs = [run_dir / rf.QUESTIONS, run_dir / rf.VOCABULARIES, run_dir / rf.GENERATIONS]

    def work():
        questions = rf.read_parquet(run_dir / rf.QUESTIONS)
        generations = rf.read_parquet(run_dir / rf.GENERATIONS)
        vocabularies = rf.read_json(run_dir / rf.VOCABULARIES)
        answers = label_answers(questions, generations, vocabularies, models.lm.tokenizer, c.positions,
                                extractor=models.extractor, progress=c.progress)
        labelled = has_labels(answers)
        # a label-free study is split by its groups alone (there are no classes to stratify)
        splits = make_splits(answers if labelled else answers.assign(correct=True), c.seeds, c.test_fraction,
                             c.validation_fraction, c.positions, c.population)
        answers["split"] = ""  # "": outside the study's population
        for part, members in splits["seeds"][str(c.seeds[0])].items():
            answers.loc[answers["id"].isin(set(members)), "split"] = part
        rf.write_parquet(run_dir / rf.ANSWERS, answers)
        rf.write_json(run_dir / rf.SPLITS, splits)
        if not labelled:
            rf.update_summary(run_dir, n=int(len(answers)), labels="none", no_correctness_auc=LABEL_FREE_NOTE,
                              population=population_summary(splits, len(answers)))
            return
        rf.update_summary(run_dir, **answer_summary(answers), population=population_summary(splits, len(answers)),
                          labels="gold")
        check_labels(answers, str(run_dir / rf.ANSWERS))

    return _run_stage(run_dir, "label", settings, inputs, [run_dir / rf.ANSWERS, run_dir / rf.SPLITS], work, force)


def stage_extract(config: Config, run_dir: Path, models: _ModelHolder, force: bool = False) -> bool:
    from .capture import CaptureReader
    from .extract import run_extract

    c = config
    settings = {"sites": c.sites, "dtype": c.dtype, "extract": c.extract}
    inputs = [run_dir / rf.ANSWERS, run_dir / rf.GENERATIONS]
    store = run_dir / rf.ACTIVATIONS
    stamp = rf.fingerprint(settings, inputs)

    def work():
        # shards of an interrupted extraction with the same inputs are kept; others are stale
        marker = store / "fingerprint"
        if force or (store.exists() and (not rf.trusted(marker) or marker.read_text() != stamp)):
            rf.remove(store)
        if not rf.trusted(marker):
            rf.write_text(marker, stamp)
        answers = rf.read_parquet(run_dir / rf.ANSWERS)
        generations = rf.read_parquet(run_dir / rf.GENERATIONS)
        capture = CaptureReader(run_dir, generations) if c.extract == "onepass" else None
        run_extract(models.lm, answers, generations, c.positions, c.sites, run_dir,
                    batch_size=c.batch_size or 16, progress=c.progress, capture=capture)
        if capture is not None:
            rf.update_summary(run_dir, extract={"mode": c.extract, "captured": len(capture.where),
                                                "read_again": capture.read_again})

    return _run_stage(run_dir, "extract", settings, inputs, [store / "index.json"], work, force)


def wants_samples(config: Config, run_dir: Path) -> bool:
    """Sampling runs with ``--also samples``, and always for a study without gold answers."""
    from .entropy import has_labels

    return "samples" in config.also or not has_labels(rf.read_parquet(run_dir / rf.ANSWERS))


def stage_samples(config: Config, run_dir: Path, models: _ModelHolder, force: bool = False) -> bool:
    """N sampled answers per question and their sampling scores (semantic entropy …; entropy.py)."""
    if not wants_samples(config, run_dir):
        return False
    from .entropy import SAMPLING_SCORES, run_sampling
    from .resample import RESAMPLES

    c = config
    settings = {"samples": c.samples, "temperature": c.sample_temperature, "judge": c.judge_equivalence,
                "judge_model": c.extractor_model if c.judge_equivalence else None, "max_new_tokens": c.max_new_tokens}
    inputs = [run_dir / rf.ANSWERS, run_dir / rf.GENERATIONS]

    def work():
        judge = (models.extractor or models.lm) if c.judge_equivalence else None
        info = run_sampling(models.lm, run_dir, n=c.samples, temperature=c.sample_temperature, seed=0, judge_lm=judge,
                            batch_size=c.batch_size, progress=c.progress)
        rf.update_summary(run_dir, sampling=info)

    outputs = [run_dir / RESAMPLES, run_dir / SAMPLING_SCORES]
    return _run_stage(run_dir, "samples", settings, inputs, outputs, work, force)


def stage_entropy(config: Config, run_dir: Path, force: bool = False) -> bool:
    """Semantic-entropy probes for every cell and their heatmap, when the run has sampling scores."""
    from . import entropy as se

    if not (run_dir / se.SAMPLING_SCORES).exists():
        return False
    c = config
    column = "semantic_entropy_judged" if c.judge_equivalence else "semantic_entropy"
    settings = {"C": c.C, "bootstrap": c.bootstrap, "sites": c.sites, "column": column, "positions": c.positions,
                "min_per_class": c.min_per_class}
    inputs = [run_dir / rf.ANSWERS, run_dir / rf.SPLITS, run_dir / rf.ACTIVATIONS, run_dir / se.SAMPLING_SCORES]

    def work():
        from .models import resolve_device

        device = resolve_device(c.device) if c.device_map is None else "cpu"
        results, scores, details = se.run_entropy_probe(run_dir, c.sites, column=column, C=c.C, n_boot=c.bootstrap,
                                                        device=device, progress=c.progress,
                                                        min_per_class=c.min_per_class)
        rf.write_csv(run_dir / se.ENTROPY_RESULTS, results)
        rf.write_parquet(run_dir / se.ENTROPY_SCORES, scores)
        n = len(rf.read_parquet(run_dir / rf.ANSWERS).query("split != ''"))
        se.plot_entropy_heatmap(results, c.positions, run_dir, model=_short_model(c.model), dataset=c.dataset, n=n)
        rf.update_summary(run_dir, entropy_probe=se.entropy_summary(results, details))

    outputs = [run_dir / se.ENTROPY_RESULTS, run_dir / se.ENTROPY_SCORES] + \
        [run_dir / f"{se.FIGURE}{suffix}" for suffix in (".png", ".svg")]
    return _run_stage(run_dir, "entropy", settings, inputs, outputs, work, force)


def stage_probe(config: Config, run_dir: Path, force: bool = False) -> bool:
    from .models import resolve_device
    from .probe import mean_over_seeds, run_probe

    c = config
    settings = {"C": c.C, "bootstrap": c.bootstrap, "sites": c.sites, "min_per_class": c.min_per_class}
    inputs = [run_dir / rf.ANSWERS, run_dir / rf.SPLITS, run_dir / rf.ACTIVATIONS]

    def work():
        device = resolve_device(c.device) if c.device_map is None else "cpu"
        results, scores = run_probe(run_dir, c.sites, C=c.C, n_boot=c.bootstrap, device=device, progress=c.progress,
                                    min_per_class=c.min_per_class)
        from .baselines import keep_baseline_rows

        rf.write_csv(run_dir / rf.PROBE_RESULTS, keep_baseline_rows(run_dir, results))  # probes + baselines
        rf.write_parquet(run_dir / rf.PROBE_SCORES, scores)
        rf.update_summary(run_dir, **best_cells(mean_over_seeds(results)))

    outputs = [run_dir / rf.PROBE_RESULTS, run_dir / rf.PROBE_SCORES]
    return _run_stage(run_dir, "probe", settings, inputs, outputs, work, force)


def best_cells(means: pd.DataFrame) -> dict:
    """summary.json's choices among probe cells: every "best" is chosen on validation AUCs."""
    from .probe import cell_summary, choose_cell

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


def stage_baselines(config: Config, run_dir: Path, models: _ModelHolder, force: bool = False) -> bool:
    """Token-probability, entropy, p(True) and family baselines on the probes' test splits (baselines.py)."""
    from . import baselines as bl

    from .entropy import SAMPLING_SCORES, with_sampling_scores

    inputs = [run_dir / rf.ANSWERS, run_dir / rf.GENERATIONS, run_dir / rf.SPLITS, run_dir / rf.PROBE_SCORES,
              run_dir / SAMPLING_SCORES]
    outputs = [run_dir / bl.BASELINE_SCORES, run_dir / bl.BASELINE_RESULTS, run_dir / bl.FAMILY_RESULTS,
               run_dir / bl.FIGURE]

    def work():
        answers = rf.read_parquet(run_dir / rf.ANSWERS)
        scores = bl.compute_scores(models.lm, answers, rf.read_parquet(run_dir / rf.GENERATIONS), config.progress,
                                   one_pass=config.extract == "onepass")
        rf.update_summary(run_dir, baseline_seconds=scores.attrs.get("seconds"))
        scores = with_sampling_scores(run_dir, scores)  # semantic entropy … when the run drew samples
        rf.write_parquet(run_dir / bl.BASELINE_SCORES, scores)
        title = f"{_short_model(config.model)} · {config.dataset} · baselines beside the best probe"
        rf.update_summary(run_dir, **bl.finish_baselines(run_dir, scores, n_boot=config.bootstrap, title=title))

    settings = {"bootstrap": config.bootstrap, "extract": config.extract}
    ran = _run_stage(run_dir, "baselines", settings, inputs, outputs, work, force)
    results = read_results(run_dir / rf.PROBE_RESULTS)
    if not ran and not (results["site"] == bl.SITE).any():  # the probe stage rewrote its table since
        with rf.stage("baselines"):
            rf.write_csv(run_dir / rf.PROBE_RESULTS,
                         bl.merge_into_results(results, read_results(run_dir / bl.BASELINE_RESULTS)))
    return ran


def stage_attention(config: Config, run_dir: Path, models: _ModelHolder, force: bool = False) -> bool:
    """With ``--also attention``: the attention heatmap (attention.py); otherwise nothing."""
    if "attention" not in config.also:
        return False
    from .attention import ATTENTION, FIGURE, run_attention

    title = f"{_short_model(config.model)} · {config.dataset} · attention of the last generated token"
    outputs = [run_dir / ATTENTION, run_dir / f"{FIGURE}.png", run_dir / f"{FIGURE}.svg"]
    return _run_stage(run_dir, "attention", {"positions": config.positions},
                      [run_dir / rf.ANSWERS, run_dir / rf.GENERATIONS], outputs,
                      lambda: run_attention(models.lm, run_dir, positions=config.positions, title=title), force)


def stage_plot(config: Config, run_dir: Path, force: bool = False) -> bool:
    from .plot import VIEWS, plot_heatmap

    inputs = [run_dir / rf.PROBE_RESULTS, run_dir / rf.ANSWERS]

    def work():
        results = read_results(run_dir / rf.PROBE_RESULTS)
        results = results[results["site"] != "baseline"]  # baselines have their own figure (baselines.png)
        n = len(rf.read_parquet(run_dir / rf.ANSWERS).query("split != ''"))  # the population
        for view in VIEWS:
            plot_heatmap(results, config.positions, run_dir / view, model=_short_model(config.model),
                         dataset=config.dataset, n=n, view=view)

    outputs = [run_dir / f"{view}{suffix}" for view in VIEWS for suffix in (".png", ".svg")]
    return _run_stage(run_dir, "plot", {"positions": config.positions}, inputs, outputs, work, force)


def stage_report(config: Config, run_dir: Path, force: bool = False) -> bool:
    from .report import REPORT, write_report

    # summary.json is not an input: every stage rewrites it, so the report would never be current
    inputs = [run_dir / rf.ANSWERS, run_dir / rf.SPLITS, run_dir / rf.PROBE_RESULTS, run_dir / rf.PROBE_SCORES]
    return _run_stage(run_dir, "report", {}, inputs, [run_dir / REPORT],
                      lambda: write_report([run_dir], run_dir / REPORT), force)


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

    from . import __version__

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
    with rf.open_run(run_dir) as notices:  # one writer; damaged files are found, named and recomputed
        for notice in notices:
            print(f"truthmap: {rf.sanitise(notice, 1000)}", file=sys.stderr)
        if given is not None:
            config = continue_config(config, run_dir, given, stages)
        _run_stages(config, run_dir, stages, force)
    return run_dir


# settings that decide what code runs and where: only ever from the command line or --config FILE
TRUST_SETTINGS = ("model", "trust_remote_code", "ray", "device_map", "extractor_model")
_NOT_CONTINUED = TRUST_SETTINGS + ("out", "progress")


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

    Read values never widen trust: the settings of TRUST_SETTINGS are never taken from the folder; one
    that differs is said on stderr, and a model other than the run's is refused unless given (a stage
    that needs no model only names the run's model in its titles).
    """
    saved = saved_config(run_dir)
    if not saved:
        return config
    fields = {f.name for f in dataclasses.fields(Config)}
    values = config.to_dict()
    values.update({k: v for k, v in saved.items() if k in fields and k not in given and k not in _NOT_CONTINUED})
    needs_model = bool(set(stages) & set(MODEL_STAGES))
    saved_model = saved.get("model")
    if isinstance(saved_model, str) and saved_model != config.model and "model" not in given:
        if needs_model:
            raise TruthmapError(f"{run_dir}: this run studied model '{rf.sanitise(saved_model)}'; give --model "
                                f"'{rf.sanitise(saved_model)}' to continue it (a model is never taken from a run folder)")
        values["model"] = saved_model  # only named in titles: no stage here loads a model
    extractor = saved.get("extractor_model")
    if "extractor_model" not in given and extractor in ("none", values["model"]):
        values["extractor_model"] = extractor  # no extractor, or the studied model: nothing more is loaded
    for name in TRUST_SETTINGS[1:]:
        if name in saved and saved[name] != values[name] and name not in given:
            print(f"truthmap: {run_dir / rf.CONFIG}: this run had {name} = {rf.sanitise(repr(saved[name]), 80)}; "
                  f"not taken from the folder (now {values[name]!r}; give it on the command line or in --config)",
                  file=sys.stderr)
    try:
        return Config(**values).validate()
    except (TypeError, ValueError) as err:
        raise TruthmapError(f"{run_dir / rf.CONFIG}: {rf.sanitise(err)}; give the settings on the command line") from None
    except TruthmapError as err:
        raise TruthmapError(f"{run_dir / rf.CONFIG}: {err}") from None


def _run_stages(config: Config, run_dir: Path, stages: tuple[str, ...], force: bool) -> None:
    saved = saved_config(run_dir)
    if saved and "generate" not in stages and saved.get("model") != config.model:
        raise TruthmapError(f"{run_dir}: this run studied model '{rf.sanitise(saved.get('model'))}', not '{config.model}'")
    rf.write_json(run_dir / rf.CONFIG, config.to_dict())
    rf.update_summary(run_dir, versions=versions(), config=config.to_dict())
    started = time.perf_counter()
    models = _ModelHolder(config)
    # with Ray, the other model stages load the model here, in the driver (loaded only if they run)
    local = _ModelHolder(dataclasses.replace(config, ray=None)) if config.ray else models
    try:
        for stage in stages:
            if stage in LABELLED_STAGES and not _labelled(run_dir):
                continue  # a label-free study: no correctness to probe, score or draw (summary.json says so)
            if stage in MODEL_STAGES:
                globals()[f"stage_{stage}"](config, run_dir, models if stage in RAY_STAGES else local, force)
            else:
                globals()[f"stage_{stage}"](config, run_dir, force)
    finally:
        models.close()
    rf.update_summary(run_dir, wall_seconds=round(time.perf_counter() - started, 2))


def _labelled(run_dir: Path) -> bool:
    """False only for a run whose answers exist and carry no gold labels."""
    from .entropy import has_labels

    path = run_dir / rf.ANSWERS
    return not path.exists() or has_labels(rf.read_parquet(path))

