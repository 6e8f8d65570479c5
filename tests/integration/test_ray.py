"""Model-backed, Ray: a study on two Ray workers equals the same study in one process, even when a
worker is killed in the middle of it.

The test starts its own one-machine Ray cluster on the loopback address (2 CPUs: 2 workers of 1 CPU,
each loading the default model, saved as a folder: tests/conftest.py ``model_folder``, a second a load
instead of the GGUF file's half minute). One single-process reference run, then one distributed run in which
the worker that starts generation chunk 1 kills itself once (TRUTHMAP_RAY_FAILPOINT, backends/ray.py):
Ray restarts it and retries that chunk. Both runs ask the lenient grader's judge (the studied model:
on the workers in the distributed run, its prompts cut into chunks of next-token scores). Small chunks
and shards give both workers several pieces of each stage; the stages after probe do not involve the
workers and are left out. Last, the analyses of a finished run, ``truthmap resample`` and ``truthmap
choose``, on the distributed run: they run the model in this process (docs/scaling.md), with Ray stopped.
"""

import json
import os

import numpy as np
import pandas as pd
import pytest

import truthmap.stages.extract
from truthmap.config import load_config
from truthmap.pipeline import run_stages

pytestmark = pytest.mark.model
# a tiny study: 24 questions, batch size 2 -> 3 generation chunks of 8; 3 feature shards of 8
STUDY = dict(limit=24, seeds=[0], test_fraction=0.3, validation_fraction=0.3, bootstrap=50, batch_size=2, max_new_tokens=12,
             dtype="float32", device="cpu", progress=False,  # the workers' dtype and device, also in this process
             min_per_class=2,  # a tiny study still gets AUCs to compare
             judge_grader=True)  # the judge: 24 prompts in batches of 2 -> 3 chunks of next-token scores
STAGES = ("generate", "label", "extract", "probe")
SHARD_SIZE = 8
SCORE_TOL = 0.05  # probe probabilities of the two runs (features within float16 rounding)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_folder):
    """(single-process run folder, distributed run folder, kill marker file)."""
    # Ray binds its node to the loopback address only when it is not set up for a real cluster
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray  # the test extra installs it (pip install 'truthmap[ray]')
    import torch

    root = tmp_path_factory.mktemp("ray")
    marker = root / "killed"
    threads = torch.get_num_threads()
    # the workers compute with one thread each; CPU float sums depend on the thread count, so the
    # reference does too, and the answers and features can be compared exactly
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(truthmap.stages.extract, "SHARD_SIZE", SHARD_SIZE)
            run_stages(load_config(None, out=str(root / "single"), model=str(model_folder), **STUDY), STAGES)
            ray.init(num_cpus=2, address="local", include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
            try:
                patch.setenv("TRUTHMAP_RAY_FAILPOINT", f"generate:1:{marker}")
                run_stages(load_config(None, out=str(root / "ray"), ray="local", model=str(model_folder), **STUDY),
                           STAGES)
            finally:
                ray.shutdown()
    finally:
        torch.set_num_threads(threads)
    return root / "single", root / "ray", marker


def test_a_worker_was_killed_and_its_chunk_retried(runs):
    single, distributed, marker = runs
    assert marker.exists()  # the worker holding chunk 1 died once, mid-run
    chunks = sorted(p.name for p in (distributed / "generations").glob("chunk-*.parquet"))
    assert chunks == ["chunk-00000.parquet", "chunk-00001.parquet", "chunk-00002.parquet"]


def test_same_answers(runs):
    single, distributed, _ = runs
    a = pd.read_parquet(single / "generations.parquet")
    b = pd.read_parquet(distributed / "generations.parquet")
    assert len(b) == 24 and b.id.is_unique  # nothing lost, nothing counted twice
    assert a.id.tolist() == b.id.tolist()
    assert a.answer.tolist() == b.answer.tolist()
    assert [list(x) for x in a.answer_ids] == [list(x) for x in b.answer_ids]
    columns = ["id", "correct", "exact_answer", "exact_answer_reason", "split"]
    pd.testing.assert_frame_equal(pd.read_parquet(single / "answers.parquet")[columns],
                                  pd.read_parquet(distributed / "answers.parquet")[columns])


def test_the_judge_on_the_workers_gives_the_log_odds_of_one_process(runs):
    """The judge's log-odds of yes over no for each answer, scored in 3 chunks on 2 workers, equal the
    single-process ones row by row (the same batches, one thread each): a chunk written to the wrong
    answers, or dropped (NaN), fails this."""
    single, distributed, _ = runs
    columns = ["id", "lenient_log_odds", "correct_lenient"]
    a = pd.read_parquet(single / "answers.parquet")[columns]
    b = pd.read_parquet(distributed / "answers.parquet")[columns]
    assert a.id.tolist() == b.id.tolist()
    asked = a.lenient_log_odds.notna()  # an empty answer is wrong without asking
    assert asked.sum() >= 20
    odds = a.lenient_log_odds[asked].to_numpy()
    assert np.unique(odds.round(3)).size >= 10  # the answers' log-odds differ: a swap would show
    np.testing.assert_allclose(b.lenient_log_odds.to_numpy(), a.lenient_log_odds.to_numpy(), rtol=0, atol=1e-5)
    assert a.correct_lenient.tolist() == b.correct_lenient.tolist()


def test_same_features(runs):
    single, distributed, _ = runs
    index = json.loads((single / "activations" / "index.json").read_text())
    shards = index["sites"]["residual"]["shards"]
    assert len(shards) == 3  # 24 examples in shards of 8: both workers extracted
    assert json.loads((distributed / "activations" / "index.json").read_text()) == index
    for shard in shards:
        a = np.load(single / "activations" / shard["file"]).astype(np.float32)
        b = np.load(distributed / "activations" / shard["file"]).astype(np.float32)
        assert a.shape == b.shape and np.abs(a).max() > 0
        assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()


def test_same_aucs(runs):
    """The same cells on the same answers; the one-process run reads its features while generating and
    the workers in a pass of their own, so features agree to float16 rounding (above), the probes'
    scores agree closely, and an AUC of these tiny test and validation parts (7 answers) may change only
    where two answers' scores nearly tie."""
    single, distributed, _ = runs
    a = pd.read_csv(single / "probe_results.csv")
    b = pd.read_csv(distributed / "probe_results.csv")
    assert a.auc.notna().sum() > 0.8 * len(a)
    cell = ["site", "layer", "position", "seed", "n_train", "n_test", "n_val"]
    pd.testing.assert_frame_equal(a[cell], b[cell])
    key = ["site", "layer", "position", "seed", "id"]
    scores = pd.read_parquet(single / "probe_scores.parquet").merge(
        pd.read_parquet(distributed / "probe_scores.parquet"), on=key, validate="one_to_one")
    assert len(scores) > 0 and (scores.score_x - scores.score_y).abs().max() < SCORE_TOL
    for column in ("auc", "val_auc"):
        same = np.isclose(a[column], b[column], atol=1e-9, equal_nan=True)
        assert same.mean() >= 0.9, (column, same.mean())


def test_resample_and_choose_on_a_ray_run_run_in_this_process(runs, model_folder, monkeypatch, capsys):
    import ray

    import truthmap.backends.ray as distributed
    from truthmap.cli import app

    _, run, _ = runs
    assert json.loads((run / "config.json").read_text())["ray"] == "local"
    assert not ray.is_initialized()  # the cluster of the run is gone

    def no_workers(config):
        raise AssertionError("an analysis of a finished run started Ray workers")

    monkeypatch.setattr(distributed, "start_workers", no_workers)
    app(["resample", str(run), "--n", "2", "--model", str(model_folder), "--quiet"])
    app(["choose", str(run), "--model", str(model_folder), "--quiet"])
    resamples = pd.read_parquet(run / "resamples.parquet")
    assert len(resamples) == 2 * 24 and (resamples.groupby("id").size() == 2).all()
    assert len(pd.read_parquet(run / "error_types.parquet")) == 24
    choice = pd.read_csv(run / "choice.csv")
    assert set(choice.strategy) == {"greedy", "random", "majority", "probe"}
    assert choice.accuracy.between(0, 1).all()
    err = capsys.readouterr().err
    assert "this run had ray" not in err  # no advice to give --ray to an analysis
    assert "deprecated" not in err  # the run named as the commands' argument
