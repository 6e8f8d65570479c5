"""Model-backed: features do not depend on batch size or padding, and the hooks read the right states."""

import numpy as np
import pytest
import torch

from truthmap.backends.hf import extract_batch

pytestmark = pytest.mark.model


def sequences(tokenizer, n=16):
    texts = [f"Question {i}: what is {i} plus {i * 7}? " + "Some padding words. " * (i % 5) for i in range(n)]
    return [tokenizer(t)["input_ids"] for t in texts]


def test_batch_size_and_padding_do_not_change_features(default_model):
    seqs = sequences(default_model.tokenizer)
    index = np.array([[0, len(s) // 2, len(s) - 1] for s in seqs])
    together = extract_batch(default_model, seqs, index, ["residual", "mlp", "attention"])
    for i in (0, 7, 15):
        alone = extract_batch(default_model, [seqs[i]], index[i : i + 1], ["residual", "mlp", "attention"])
        for site in together:
            a, b = together[site][:, i], alone[site][:, 0]
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_residual_rows_equal_hidden_states_of_the_model(default_model):
    seqs = sequences(default_model.tokenizer, 3)
    index = np.array([[1, len(s) - 1] for s in seqs])
    features = extract_batch(default_model, seqs, index, ["residual"])["residual"]  # [R, B, P, d]
    assert features.shape == (default_model.n_layers + 1, 3, 2, default_model.hidden_size)
    with torch.inference_mode():
        out = default_model.model(torch.tensor([seqs[2]]), output_hidden_states=True)
    states = out.hidden_states
    for layer in (0, 5, default_model.n_layers - 1):
        assert torch.allclose(features[layer, 2, 1], states[layer][0, len(seqs[2]) - 1], rtol=1e-4, atol=1e-4)
    # transformers applies the final norm to its last hidden state; our last row is the block output
    assert features.shape[0] == len(states)
