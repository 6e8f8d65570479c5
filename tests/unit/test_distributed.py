"""Model-free checks of the Ray path (truthmap/backends/ray.py): the driver's side of the work loop —
chunks and shards that come back in any order are merged in their fixed order, saved once, and
resumed — with stand-in workers; settings; and the error when Ray is missing. The real workers are
tested in tests/integration/test_ray.py."""

from __future__ import annotations

import sys
import numpy as np
import pandas as pd
import pytest
from _synthetic import fake_model, fake_remote, prompts

from truthmap.backends import hf
from truthmap.stages import generate
from truthmap import runfolder as rf
from truthmap.config import load_config
from truthmap.errors import TruthmapError
from truthmap.stages.extract import run_extract


class FakeWorkers:
    """Stand-in for backends.ray.Workers: does the work here, hands results back in reverse order."""

    def __init__(self):
        self.asked, self.closed = [], 0

    def close(self):
        self.closed += 1

    def auto_batch_size(self, longest):
        return 3

    def answer_chunks(self, jobs, max_new_tokens, batch_size, bar=None):
        self.asked += sorted(jobs)
        for k in sorted(jobs, reverse=True):
            answers, _ = hf.answer_prompts(None, jobs[k], max_new_tokens, batch_size, [1])
            yield k, answers

    def extract_shards(self, jobs, positions, sites, batch_size, bar=None):
        self.asked += sorted(jobs)
        for k in sorted(jobs, reverse=True):
            sequences, index, ids = jobs[k]
            # each example's cells hold its own number: a shard merged in the wrong place is seen
            value = np.array([float(i.split("-")[1]) for i in ids], np.float16)
            yield k, {site: np.broadcast_to(value[None, None, :, None], (3, len(positions), len(ids), 4)).copy()
                      for site in sites}


def test_chunks_from_workers_in_any_order_give_the_single_process_answers(tmp_path, fake_generation):
    plain = generate.generate_answers(fake_model(), prompts(), 8, batch_size=3, progress=False)
    plain_batches = sorted(fake_generation)
    fake_generation.clear()
    workers = FakeWorkers()
    with rf.open_run(tmp_path):
        store = rf.ChunkStore(tmp_path / "generations", "k")
        spread = generate.generate_answers(fake_remote(workers), prompts(), 8, batch_size=3,
                                           progress=False, chunks=store)
    assert spread == plain and sorted(fake_generation) == plain_batches  # the same batches, the same answers
    assert workers.asked == [0, 1, 2, 3]  # 37 prompts in chunks of 4 batches of 3
    # a driver that died after chunks 0 and 3: the rerun asks the workers for the others only
    for k in (1, 2):
        (tmp_path / "generations" / f"chunk-0000{k}.parquet").unlink()
    workers = FakeWorkers()
    with rf.open_run(tmp_path):
        store = rf.ChunkStore(tmp_path / "generations", "k")
        again = generate.generate_answers(fake_remote(workers), prompts(), 8, batch_size=3,
                                          progress=False, chunks=store)
    assert again == plain and workers.asked == [1, 2]


def test_without_a_chunk_store_workers_still_get_whole_batches(fake_generation):
    plain = generate.generate_answers(fake_model(), prompts(), 8, batch_size=3, progress=False)
    workers = FakeWorkers()
    spread = generate.generate_answers(fake_remote(workers), prompts(), 8, progress=False)
    assert spread == plain and workers.asked == [0, 1, 2, 3]  # batch size from the workers: 3


def test_sampling_is_refused_on_workers(fake_generation):
    with pytest.raises(TruthmapError, match="without --ray"):
        generate.generate_answers(fake_remote(FakeWorkers()), prompts(), 8, 3, False, sample=(1.0, 0))


def test_shards_from_workers_land_in_their_place(tmp_path, monkeypatch):
    n, positions = 10, ["last_q", "-1"]
    ids = [f"q-{i}" for i in range(n)]
    answers = pd.DataFrame({"id": ids, "pos_last_q": 2, "pos_-1": [3 if i % 3 else -1 for i in range(n)]})
    generations = pd.DataFrame({"id": ids[::-1], "prompt_ids": [[5, 6, 7]] * n, "answer_ids": [[8]] * n})
    workers = FakeWorkers()
    lm = fake_remote(workers, n_layers=2, hidden_size=4)
    with rf.open_run(tmp_path):
        run_extract(lm, answers, generations, positions, ["residual"], tmp_path, shard_size=4, progress=False)
    assert workers.asked == [0, 1, 2]
    store = tmp_path / "activations"
    merged = np.concatenate([np.load(store / "residual" / f"shard-0000{k}.npy") for k in range(3)], axis=2)
    assert merged.shape == (3, 2, n, 4)
    assert merged[0, 0, :, 0].tolist() == list(range(n))  # every example in its row, in the ids' order
    assert np.load(store / "valid.npy").tolist() == [[True, bool(i % 3)] for i in range(n)]


def test_ray_settings_are_checked():
    assert load_config(None, ray="local", ray_workers=2, ray_gpus_per_worker=0).ray_workers == 2
    for bad in (dict(ray=True), dict(ray=""), dict(ray_workers=0), dict(ray_gpus_per_worker=-1),
                dict(ray_cpus_per_worker=0)):
        with pytest.raises(TruthmapError):
            load_config(None, **bad)


def test_cli_ray_flag_takes_an_optional_address(monkeypatch):
    import truthmap.cli as cli
    import truthmap.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_stages", lambda config, **kw: seen.append(config) or config.run_dir())
    monkeypatch.setattr(cli, "_report", lambda run_dir: None)
    cli.app(["run", "--ray", "--out", "x"])
    cli.app(["run", "--ray", "ray://head:10001", "--ray-gpus-per-worker", "2", "--out", "x"])
    cli.app(["run", "--out", "x"])
    assert [c.ray for c in seen] == ["local", "ray://head:10001", None]
    assert seen[1].ray_gpus_per_worker == 2


def test_missing_ray_is_a_clear_error(monkeypatch):
    from truthmap.backends.ray import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(TruthmapError, match=r"pip install 'truthmap\[ray\]'"):
        import_ray()


def test_both_backends_keep_the_contract_and_the_factory_puts_analyses_in_this_process(monkeypatch):
    import truthmap.backends.hf as hf_backend
    import truthmap.backends.ray as ray_backend
    from truthmap.backends import ModelBackend, Models

    here, remote = fake_model(), fake_remote(FakeWorkers())
    assert isinstance(here, ModelBackend) and isinstance(remote, ModelBackend)
    assert here.in_process and not remote.in_process
    started, loaded = [], []
    monkeypatch.setattr(ray_backend, "start_workers", lambda config: started.append(config.ray) or remote)
    monkeypatch.setattr(hf_backend, "load_model", lambda *args: loaded.append(args[0]) or here)
    config = load_config(None, ray="local", extractor_model="none")
    with Models(config) as analysis:  # resample, choose, baselines …: in this process, even for a --ray run
        assert analysis.lm is here and analysis.extractor is None
    with Models(config, on_workers=True) as pool:
        assert pool.lm is remote and pool.lm is remote  # started once
    assert started == ["local"] and loaded == [config.model] and remote.workers.closed == 1
    with Models(load_config(None), on_workers=True) as plain:  # no --ray: in this process
        assert plain.lm is here
    assert started == ["local"]


def test_closing_the_pool_stops_its_workers_once():
    class Actors:
        killed, shut = [], []

        def kill(self, actor):
            self.killed.append(actor)

        def shutdown(self):
            self.shut.append(True)

    from truthmap.backends.ray import Workers

    ray = Actors()
    remote = fake_remote(Workers(ray, ["a", "b"], started_ray=True))
    remote.close()
    remote.close()
    assert ray.killed == ["a", "b"] and ray.shut == [True]


class _Ref:
    def __init__(self, k, value):
        self.k, self.value = k, value


class _ReverseRay:
    """Stand-in for the ray module: the work in flight finishes last-submitted first."""

    def __init__(self):
        self.finished = []

    def wait(self, refs, num_returns=1):
        return [refs[-1]], refs[:-1]

    def get(self, ref):
        self.finished.append(ref.k)
        return ref.value


class _ScoringActor:
    """Stand-in for a worker's ``score``: each prompt's score is its own number (its first id) and the
    token set's index; records the chunks it was given."""

    def __init__(self, seen):
        self.seen = seen
        self.score = self

    def remote(self, k, prompts, token_sets, batch_size, shared):
        self.seen.append((k, [p[0] for p in prompts], shared))
        rows = range(len(prompts)) if shared is None else [i for indices, _ in shared for i in indices]
        out = np.full((len(prompts), len(token_sets)), np.nan)
        for i in rows:
            out[i] = [prompts[i][0] + s / 10 for s in range(len(token_sets))]
        return _Ref(k, out)


@pytest.mark.parametrize("with_groups", [False, True])
def test_next_token_scores_from_workers_in_any_order_come_back_in_the_prompts_order(with_groups):
    """21 prompts (prompt i starts with id i, lengths shuffled): chunks of 4 batches by length (batch
    size 2: 8, 8, 5 prompts), finished in reverse; every row gets its own prompt's score. With groups
    (3 prompts per group, the contract's ``shared``; batch size 1: 4 groups a chunk), whole groups go to
    a chunk in their order, their prompts renumbered within it."""
    from truthmap.backends.ray import SCORE_CHUNK_BATCHES, Workers

    rng = np.random.default_rng(0)
    prompts = [[i] + [7] * int(n) for i, n in enumerate(rng.integers(0, 9, 21))]
    shared = [(list(range(g, g + 3)), [99]) for g in range(0, 21, 3)] if with_groups else None
    seen = []
    ray = _ReverseRay()
    workers = Workers(ray, [_ScoringActor(seen), _ScoringActor(seen)], started_ray=False)
    out = workers.next_token_logprobs(prompts, [[1], [2]], 1 if with_groups else 2, shared)
    np.testing.assert_array_equal(out, [[i, i + 0.1] for i in range(21)])
    assert ray.finished != sorted(ray.finished)  # they did finish out of order
    chunks = [ids for _, ids, _ in sorted(seen, key=lambda s: s[0])]
    if with_groups:
        assert chunks == [list(range(12)), list(range(12, 21))]
        assert [groups for *_, groups in sorted(seen, key=lambda s: s[0])][1] == [
            ([0, 1, 2], [99]), ([3, 4, 5], [99]), ([6, 7, 8], [99])]
    else:
        assert [len(ids) for ids in chunks] == [2 * SCORE_CHUNK_BATCHES] * 2 + [5]
        assert sorted(i for ids in chunks for i in ids) == list(range(21))  # each prompt once
        lengths = [len(prompts[i]) for ids in chunks for i in ids]
        assert lengths == sorted(lengths)  # the single-process backend's length order: the same batches
