"""The capture's layout (capture.py) without a model: which answer tokens a bounded batch holds."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from truthmap.stages.capture import TAIL, CapturePlan, capture_plan


@pytest.mark.parametrize("head,tail", [(24, 0), (4, 8), (1, 3)])
@pytest.mark.parametrize("n_answer", [1, 3, 5, 12, 13, 30])
def test_what_the_ring_holds_is_what_is_read_back(head, tail, n_answer):
    plan = CapturePlan(("residual",), head, tail)
    slots = [None] * plan.slots
    for token in range(n_answer):  # as generation writes them, in order
        slot = plan.write_slot(token)
        if slot is not None:
            slots[slot] = token
    held = [t for t in range(n_answer) if plan.slot(t, n_answer) is not None]
    for token in held:
        assert slots[plan.slot(token, n_answer)] == token
    expected = set(range(min(head, n_answer))) | set(range(max(0, n_answer - tail), n_answer))
    assert set(held) == expected  # the first head and the last tail tokens, nothing else


def fake_model(n_layers=30, hidden=576, dtype=torch.float32):
    """What the plan asks of a backend: its layout and the bytes of one value in the model's dtype."""
    return SimpleNamespace(n_layers=n_layers, hidden_size=hidden, bytes_per_value=lambda: dtype.itemsize)


def test_the_plan_keeps_a_batch_within_its_byte_bound():
    lm = fake_model()
    slot = 16 * 31 * 576 * 4  # a batch of 16, residual rows 0..30, float32
    assert capture_plan(lm, ["residual"], 16, 24, budget=25 * slot) == CapturePlan(("residual",), 24, 0)
    plan = capture_plan(lm, ["residual"], 16, 64, budget=20 * slot)
    assert plan == CapturePlan(("residual",), 20 - 1 - TAIL, TAIL) and plan.slots * slot <= 20 * slot
    assert capture_plan(lm, ["residual"], 16, 64, budget=10 * slot) is None  # too small: extract reads it all
    half = capture_plan(fake_model(dtype=torch.float16), ["residual"], 16, 64, budget=20 * slot)
    assert half.slots == 40  # states held in the model's dtype: twice as many slots


# ---------------------------------------------------------------- captured states read only through the manifest

def _captured_run(run, states):
    """A run whose generation captured ``states`` ([rows, slots, layers, d]) for two answers in one chunk."""
    import pandas as pd

    from truthmap import runfolder as rf
    from truthmap.stages.capture import CapturePlan, capture_path

    plan = CapturePlan(("residual",), 2, 0)
    with rf.open_run(run):
        with rf.stage("generate"):
            folder = run / rf.GENERATION_CHUNKS
            rf.write_json(folder / rf.CHUNK_PLAN, {"key": "k", "capture": plan.to_dict()})
            rf.write_parquet(folder / "chunk-00000.parquet",
                             pd.DataFrame({"row": [0, 1], "captured": [2, 2], "answer_ids": [[5, 6], [7, 8]]}))
            rf.write_npy(capture_path(folder, 0, "residual"), states)


def _fill(run):
    import pandas as pd

    from truthmap import runfolder as rf
    from truthmap.stages.capture import CaptureReader

    generations = pd.DataFrame({"id": ["a", "b"], "answer_ids": [[5, 6], [7, 8]]})
    store = {"residual": np.zeros((3, 1, 2, 4), np.float16)}  # [layers, positions, answers, d]
    with rf.open_run(run) as notices:
        reader = CaptureReader(run, generations)
        missing = reader.fill(store, ["residual"], ["a", "b"], np.array([3, 3]), np.array([2, 2]),
                              np.array([[3], [3]]))  # the first answer token of each
    return store["residual"], missing, notices


def test_captured_states_are_read_only_when_the_manifest_vouches_for_them(tmp_path):
    from truthmap import runfolder as rf
    from truthmap.stages.capture import capture_path

    states = np.arange(2 * 3 * 3 * 4, dtype=np.float16).reshape(2, 3, 3, 4)
    run = tmp_path / "run"
    _captured_run(run, states)
    filled, missing, _ = _fill(run)
    assert missing == [] and np.array_equal(filled[:, 0, 0], states[0, 1]) and np.array_equal(filled[:, 0, 1], states[1, 1])
    path = capture_path(run / rf.GENERATION_CHUNKS, 0, "residual")
    # altered and dropped from the manifest: never read, both answers read again by the forward pass
    manifest = json.loads((run / rf.MANIFEST).read_text())
    del manifest["files"][path.relative_to(run).as_posix()]
    (run / rf.MANIFEST).write_text(json.dumps(manifest))
    np.save(path, states + 1000)
    filled, missing, _ = _fill(run)
    assert missing == [0, 1] and not filled.any()
    # deleted (with no shard to fall back on): the answers are read again, no traceback
    _captured_run(run, states)
    path.unlink()
    filled, missing, notices = _fill(run)
    assert missing == [0, 1] and any("capture-00000-residual.npy: missing" in n for n in notices)
    # listed and intact but of another shape than the run's store (a crafted plan): read again
    _captured_run(run, np.zeros((2, 3, 5, 4), np.float16))
    assert _fill(run)[1] == [0, 1]
