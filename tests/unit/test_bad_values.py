"""Non-finite hidden states are found and named; cells of positions that do not exist are not checked."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from truthmap.backends import hf
from truthmap.errors import TruthmapError

FAKE = SimpleNamespace(n_layers=2, hidden_size=4, model=SimpleNamespace(dtype=torch.float16))
POSITIONS = ["last_q", "exact_answer_first"]


def fake_batch(values_at):
    """An extract_batch whose features are 1.0 except ``value`` at (layer row, example, position)."""
    def extract_batch(lm, sequences, index, sites):
        features = torch.ones((lm.n_layers + 1, len(sequences), index.shape[1], lm.hidden_size))
        for (row, example, position), value in values_at.items():
            features[row, example, position, 0] = value
        return {"residual": features}

    return extract_batch


@pytest.mark.parametrize("value,message", [
    (float("inf"), "the model produced NaN/inf in float16; use --dtype float32"),
    (float("nan"), "the model produced NaN/inf in float16"),
    (1e6, r"a value beyond float16's range \(±65504\)"),  # finite in the model, not in the store
])
def test_a_non_finite_value_names_example_site_layer_and_position(monkeypatch, value, message):
    monkeypatch.setattr(hf, "extract_batch", fake_batch({(1, 1, 1): value}))
    index = np.array([[3, 5], [3, 4]])
    with pytest.raises(TruthmapError, match=rf"example 'b', site residual, layer row 1, position exact_answer_first: "
                                            rf"{message}"):
        hf.extract_shard(FAKE, [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]], index, ["a", "b"], POSITIONS, ["residual"])


def test_a_position_that_does_not_exist_is_not_checked_and_holds_zeros(monkeypatch):
    # position -1 reads token 0, whose state may overflow (attention sinks do): it is not a feature
    monkeypatch.setattr(hf, "extract_batch", fake_batch({(2, 0, 1): float("inf")}))
    index = np.array([[3, -1]])
    store = hf.extract_shard(FAKE, [[1, 2, 3, 4]], index, ["a"], POSITIONS, ["residual"])
    features = store["residual"]
    assert features.dtype == np.float16 and np.isfinite(features).all()
    assert (features[:, 1] == 0).all() and (features[:, 0] == 1).all()
