"""The stage table (pipeline.STAGE_TABLE): one writer per run-folder file, and fingerprints that cover
every file a stage reads. Model-free: the stages after extract run on a synthetic run folder."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pandas as pd
import pytest
from _synthetic import POSITIONS, make_run, seal

from truthmap import pipeline
from truthmap import runfolder as rf
from truthmap.config import Config


def test_every_run_folder_file_has_one_writing_stage_and_is_read_after_it():
    writer = {}
    for name, stage in pipeline.STAGE_TABLE.items():
        assert stage.name == name
        for output in stage.outputs:
            assert output not in writer, f"{output}: written by {writer.get(output)} and {name}"
            assert output.split("/")[0] in rf.OWN_NAMES  # named in runfolder/names.py
            writer[output] = name
    assert not {rf.SUMMARY, rf.CONFIG, rf.STAGES, rf.MANIFEST} & set(writer)  # every stage's, or none's
    assert writer[rf.PROBE_RESULTS] == "probe" and writer[rf.BASELINE_RESULTS] == "baselines"
    order = list(pipeline.STAGES)
    for name, stage in pipeline.STAGE_TABLE.items():
        for read in stage.inputs:
            makers = [w for out, w in writer.items() if out == read or out.startswith(read + "/")]
            assert makers and all(order.index(m) < order.index(name) for m in makers), (name, read)
    assert pipeline.RAY_STAGES == ("generate", "label", "extract")
    assert set(pipeline.MODEL_STAGES) == {"generate", "label", "extract", "samples", "baselines", "attention"}


@pytest.fixture
def run(tmp_path):
    folder = make_run(tmp_path / "run", n=120)
    answers = pd.read_parquet(folder / rf.ANSWERS)
    answers.assign(split="train").to_parquet(folder / rf.ANSWERS, index=False)  # every answer in the population
    baseline_rows(0.6).to_csv(folder / rf.BASELINE_RESULTS, index=False)  # there to be read by mistake
    return seal(folder)


def baseline_rows(auc: float) -> pd.DataFrame:
    return pd.DataFrame([{"site": "baseline", "layer": -1, "position": "logprob_mean", "seed": s, "auc": auc,
                          "auc_lo": auc - 0.1, "auc_hi": auc + 0.1, "accuracy": None, "n_train": 0, "n_test": 42}
                         for s in (0, 1)])


def config_of(run: Path) -> Config:
    return Config(out=str(run), positions=POSITIONS, seeds=[0, 1], bootstrap=20, min_per_class=2, device="cpu",
                  progress=False, model="tiny-model", dataset="toy")


def test_the_probe_plot_and_report_stages_read_only_what_their_fingerprints_cover(run, monkeypatch):
    reads = []
    verify = rf.Run.verify
    monkeypatch.setattr(rf.Run, "verify", lambda run, name: reads.append(run.path(name)) or verify(run, name))
    config = config_of(run)
    with rf.Run.open(run) as held:
        for name in ("probe", "wholemap", "plot", "report"):
            stage = pipeline.STAGE_TABLE[name]
            reads.clear()
            assert pipeline.run_stage(stage, config, held)
            read = {p.relative_to(run).as_posix() for p in reads}
            covered = {r for r in read if any(r == i or r.startswith(i + "/") for i in stage.inputs)}
            # summary.json and config.json: titles and names, rewritten by every stage (never an input);
            # stages.json: the bookkeeping of run_stage
            assert read - covered <= {rf.SUMMARY, rf.CONFIG, rf.STAGES}, (name, read - covered)
            assert read & set(stage.inputs), name
    results = pd.read_csv(run / rf.PROBE_RESULTS)
    assert set(results.site) == {"residual"}  # the probes' rows only


def test_baseline_rows_make_the_report_stale_but_never_touch_the_probe_stage(run):
    config = config_of(run)
    with rf.Run.open(run) as held:
        for name in ("probe", "report"):
            pipeline.run_stage(pipeline.STAGE_TABLE[name], config, held)
        before = (run / rf.PROBE_RESULTS).read_bytes()
        with rf.stage("baselines"):
            rf.write_csv(run / rf.BASELINE_RESULTS, baseline_rows(0.7))
        assert not pipeline.run_stage(pipeline.STAGE_TABLE["probe"], config, held)  # it never read them
        assert pipeline.run_stage(pipeline.STAGE_TABLE["report"], config, held)  # it shows them
    assert (run / rf.PROBE_RESULTS).read_bytes() == before
    from truthmap.metrics import read_run_results

    both = read_run_results(run)
    assert both.site.tolist()[-2:] == ["baseline", "baseline"] and (both.site == "residual").sum() == len(
        pd.read_csv(run / rf.PROBE_RESULTS))


@pytest.mark.parametrize("entry,data", [
    ("stages.generate.run_generate", ["lm", "questions"]),
    ("stages.extract.run_extract", ["lm", "answers", "generations", "positions", "sites", "run_dir"]),
    ("stages.probe.run_probe", ["run_dir", "sites"]),
    ("analyses.resample.run_resample", ["lm", "run_dir"]),
])
def test_stage_entry_points_take_every_setting_by_keyword(entry, data):
    module, name = entry.rsplit(".", 1)
    function = getattr(importlib.import_module(f"truthmap.{module}"), name)
    parameters = inspect.signature(function).parameters.values()
    assert [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY] == data


@pytest.fixture
def sampling_run(tmp_path, monkeypatch):
    """A run folder the samples stage can run on, with the model's part of sampling replaced: what it
    is asked to draw is recorded."""
    from truthmap.analyses import entropy, resample

    folder = make_run(tmp_path / "run", n=12)
    answers = pd.read_parquet(folder / rf.ANSWERS)
    answers[["id", "question", "gold"]].to_parquet(folder / rf.QUESTIONS, index=False)
    (folder / rf.VOCABULARIES).write_text('{"colours": ["red"]}')
    drawn = []

    def sample_answers(lm, prompt_ids, *, n, temperature, max_new_tokens, **_):
        drawn.append({"n": n, "temperature": temperature, "max_new_tokens": max_new_tokens})
        return [[([7], True)] * n for _ in prompt_ids]

    def label_resamples(lm, questions, generations, samples, vocabularies, positions, **_):
        ids = [i for i, row in zip(questions["id"], samples) for _ in row]
        return pd.DataFrame({"id": ids, "sample": [k for row in samples for k in range(len(row))], "answer": "x"})

    monkeypatch.setattr(resample, "sample_answers", sample_answers)
    monkeypatch.setattr(resample, "label_resamples", label_resamples)
    monkeypatch.setattr(entropy, "token_logprobs", lambda lm, generations, table: [[-0.5]] * len(table))
    monkeypatch.setattr(entropy, "sampling_scores",
                        lambda table, answers, judge: pd.DataFrame({"id": answers["id"], "semantic_entropy": 0.0}))
    return seal(folder), drawn


def test_the_samples_stage_reruns_when_a_setting_or_input_it_reads_changes(sampling_run, monkeypatch):
    from types import SimpleNamespace

    run, drawn = sampling_run
    stage = pipeline.STAGE_TABLE["samples"]
    models = SimpleNamespace(lm=object(), extractor=None)
    reads = []
    verify = rf.Run.verify
    monkeypatch.setattr(rf.Run, "verify", lambda run, name: reads.append(run.path(name)) or verify(run, name))
    config = config_of(run).replace(also=["samples"])
    with rf.Run.open(run) as held:
        assert pipeline.run_stage(stage, config, held, models)
        read = {p.relative_to(run).as_posix() for p in reads}
        covered = {r for r in read if any(r == i or r.startswith(i + "/") for i in stage.inputs)}
        assert read - covered <= {rf.SUMMARY, rf.CONFIG, rf.STAGES}, read - covered
        assert not pipeline.run_stage(stage, config, held, models)  # nothing changed: skipped
        more = config.replace(samples=config.samples + 3)
        assert pipeline.run_stage(stage, more, held, models)
        assert not pipeline.run_stage(stage, more, held, models)
        hotter = more.replace(sample_temperature=0.7)
        assert pipeline.run_stage(stage, hotter, held, models)
        with rf.stage("generate"):  # the grading vocabularies change (a new task version, say)
            rf.write_json(run / rf.VOCABULARIES, {"colours": ["red", "blue"]})
        assert pipeline.run_stage(stage, hotter, held, models)
        assert not pipeline.run_stage(stage, hotter, held, models)
    assert [(d["n"], d["temperature"]) for d in drawn] == [(5, 1.0), (8, 1.0), (8, 0.7), (8, 0.7)]


def test_an_optional_analysis_that_cannot_run_is_skipped_with_its_reason_and_the_run_finishes(run, capsys):
    import numpy as np

    from truthmap.errors import CannotRun

    ids = pd.read_parquet(run / rf.ANSWERS)["id"]
    few_low = np.where(np.arange(len(ids)) < 3, 0.0, 1.0)  # 3 low-entropy answers in all: too few to train on
    pd.DataFrame({"id": ids, "semantic_entropy": few_low}).to_parquet(run / rf.SAMPLING_SCORES, index=False)
    seal(run)
    config = config_of(run).replace(min_per_class=5)
    stages = ("probe", "entropy", "plot", "report")
    pipeline.run_stages(config, stages=stages)
    line = [k for k in capsys.readouterr().err.splitlines() if "entropy skipped" in k]
    assert len(line) == 1 and "low-entropy" in line[0] and "--samples" in line[0]
    summary = rf.read_json(run / rf.SUMMARY)
    assert "low-entropy answers" in summary["skipped"]["entropy"]
    assert (run / rf.REPORT).exists() and (run / "heatmap.png").exists()  # the stages after it ran
    assert not (run / rf.ENTROPY_RESULTS).exists()
    with pytest.raises(CannotRun):  # asked for by name, it is an error
        pipeline.run_stages(config, stages=("entropy",))

    balanced = np.where(np.arange(len(ids)) % 2 == 0, 0.0, 1.0)  # with enough of each it runs, and is no longer "skipped"
    with rf.open_run(run):
        with rf.stage("samples"):
            rf.write_parquet(run / rf.SAMPLING_SCORES, pd.DataFrame({"id": ids, "semantic_entropy": balanced}))
    pipeline.run_stages(config, stages=stages)
    summary = rf.read_json(run / rf.SUMMARY)
    assert "entropy" not in summary["skipped"] and "entropy_probe" in summary
    assert (run / rf.ENTROPY_RESULTS).exists()

    with rf.open_run(run):  # too few again: the earlier run's results and summary fields go with the skip
        with rf.stage("samples"):
            rf.write_parquet(run / rf.SAMPLING_SCORES, pd.DataFrame({"id": ids, "semantic_entropy": few_low}))
    pipeline.run_stages(config, stages=stages)
    summary = rf.read_json(run / rf.SUMMARY)
    assert "entropy" in summary["skipped"] and "entropy_probe" not in summary
    assert not (run / rf.ENTROPY_RESULTS).exists() and not (run / "heatmap_entropy.png").exists()


@pytest.mark.parametrize("progress", [True, False])
def test_quiet_hides_the_libraries_loading_bars(progress, monkeypatch, capsys):
    import sys

    from truthmap.backends import Models, hf

    def load_model(*args):
        print("Converting and de-quantizing GGUF tensors...: 100%", file=sys.stderr)
        return "the model"

    monkeypatch.setattr(hf, "load_model", load_model)
    assert Models(Config(progress=progress, device="cpu")).lm == "the model"
    assert ("GGUF" in capsys.readouterr().err) == progress


def _fresh_python(code: str):
    """Run ``code`` in a new Python process (a registry or an import state of its own) on this checkout."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_a_stage_that_registers_itself_is_run_in_its_step_and_gets_a_command():
    """Adding a stage is its module (ending in register(Stage(...))) and the import that loads it: the
    pipeline's order and the CLI's commands come from the registry, not from tables kept by hand."""
    code = (
        "from truthmap.stages.base import Stage, register, fields\n"
        "register(Stage('toy', '4f', 'A toy stage (toy.csv).', lambda s: None, inputs=('answers.parquet',),\n"
        "               outputs=('toy.csv',), settings=fields('seeds'), labelled=True))\n"
        "from truthmap import pipeline\n"
        "from truthmap.cli import cli\n"
        "order = list(pipeline.STAGES)\n"
        "assert order.index('cost') < order.index('toy') < order.index('plot'), order\n"
        "assert 'toy' in pipeline.LABELLED_STAGES and 'toy' not in pipeline.MODEL_STAGES\n"
        "assert 'Stage 4f: A toy stage' in cli.commands['toy'].help\n"
        "assert 'toy' in cli.commands['run'].help\n"
        "print('ok')\n")
    result = _fresh_python(code)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_listing_the_stages_loads_neither_torch_nor_the_model_code():
    """`truthmap --help` and a stage's --help import every stage module (the registry); torch and the
    model backends are imported only where a stage runs, so the help stays quick."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from truthmap.cli import cli\n"
        "for args in (['--help'], ['probe', '--help'], ['wholemap', '--help'], ['run', '--help']):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "assert 'probe' in cli.commands and 'wholemap' in cli.commands\n"
        "heavy = [m for m in ('torch', 'transformers', 'truthmap.backends.hf') if m in sys.modules]\n"
        "print(heavy)\n")
    result = _fresh_python(code)
    assert result.stdout.strip() == "[]", (result.stdout + result.stderr)[-2000:]


def test_the_settings_schema_names_the_stages_the_registry_declares():
    """config.py (below the stages) names the model stages, the Ray stages and the --also passes by
    hand; they are the registry's."""
    from truthmap import config

    assert config.MODEL_STAGES == pipeline.MODEL_STAGES
    assert config.RAY_STAGES == pipeline.RAY_STAGES
    assert set(config.ALSO) == {name for name, stage in pipeline.STAGE_TABLE.items() if stage.also}
    assert [pipeline.STAGE_TABLE[n].step for n in pipeline.STAGES] == sorted(
        (s.step for s in pipeline.STAGE_TABLE.values()), key=lambda step: (int(step.rstrip("abcdefgh")), step))
