"""The capture's layout (capture.py) without a model: which answer tokens a bounded batch holds."""

from types import SimpleNamespace

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
    return SimpleNamespace(n_layers=n_layers, hidden_size=hidden, model=SimpleNamespace(dtype=dtype))


def test_the_plan_keeps_a_batch_within_its_byte_bound():
    lm = fake_model()
    slot = 16 * 31 * 576 * 4  # a batch of 16, residual rows 0..30, float32
    assert capture_plan(lm, ["residual"], 16, 24, budget=25 * slot) == CapturePlan(("residual",), 24, 0)
    plan = capture_plan(lm, ["residual"], 16, 64, budget=20 * slot)
    assert plan == CapturePlan(("residual",), 20 - 1 - TAIL, TAIL) and plan.slots * slot <= 20 * slot
    assert capture_plan(lm, ["residual"], 16, 64, budget=10 * slot) is None  # too small: extract reads it all
    half = capture_plan(fake_model(dtype=torch.float16), ["residual"], 16, 64, budget=20 * slot)
    assert half.slots == 40  # states held in the model's dtype: twice as many slots
