"""Model-backed: what generation reads in one pass equals what a separate forward pass reads.

Tolerances (stated in docs/run-folder.md): the one-pass and separate features of an example at a position
differ by at most ``FEATURE_TOL`` times the largest value of that (site, layer, position) vector, i.e. a few
float16 steps of the store, in a float32 model; ``FEATURE_TOL_HALF`` in a float16 model, whose own
arithmetic differs between a cached decoding step and a full pass. Token probabilities and entropies agree
to 1e-4 (float32).
"""

import numpy as np
import pandas as pd
import pytest
import torch

from truthmap import runfolder as rf
from truthmap.positions import site_rows
from truthmap.backends.hf import BatchCapture, extract_shard
from truthmap.stages.baselines import p_true, p_true_variants
from truthmap.stages.capture import CaptureReader, bytes_per_slot
from truthmap.data import load_questions
from truthmap.stages.generate import run_generate

pytestmark = pytest.mark.model

FEATURE_TOL = 2e-3
FEATURE_TOL_HALF = 6e-2
SITES = ["residual", "mlp", "attention"]


def every_position(generations: pd.DataFrame) -> np.ndarray:
    """Index ``[n, 1 + longest answer]``: the prompt's last token, then every answer token (-1 past the end)."""
    n_prompt = [len(p) for p in generations.prompt_ids]
    n_answer = [len(a) for a in generations.answer_ids]
    index = np.full((len(generations), 1 + max(n_answer)), -1)
    for i, (p, a) in enumerate(zip(n_prompt, n_answer)):
        index[i, 0] = p - 1
        index[i, 1 : 1 + a] = np.arange(p, p + a)
    return index


def one_pass_and_separate(lm, generations, folder, index, sites):
    """(store filled from the capture, rows it could not fill, store of the separate pass)."""
    reader = CaptureReader(folder, generations)
    ids = generations.id.tolist()
    store = {s: np.zeros((len(site_rows(lm, s)), index.shape[1], len(ids), lm.hidden_size), np.float16) for s in sites}
    n_prompt = np.array([len(p) for p in generations.prompt_ids])
    n_answer = np.array([len(a) for a in generations.answer_ids])
    missing = reader.fill(store, sites, ids, n_prompt, n_answer, index)
    sequences = [list(p) + list(a) for p, a in zip(generations.prompt_ids, generations.answer_ids)]
    names = [str(p) for p in range(index.shape[1])]
    separate = extract_shard(lm, sequences, index, ids, names, sites, batch_size=4)
    return store, missing, separate


def assert_close(store, separate, tolerance):
    for site, expected in separate.items():
        a, b = store[site].astype(np.float32), expected.astype(np.float32)  # [R, P, n, d]
        scale = np.abs(b).max(axis=-1, keepdims=True)
        assert np.all(np.abs(a - b) <= tolerance * scale + 1e-6), (site, float((np.abs(a - b) / (scale + 1e-9)).max()))
        assert np.count_nonzero(b) > 0.5 * b.size  # most cells exist, so the check above checks something


def generate(lm, tmp_path, n, batch_size, sites, max_new_tokens=24):
    questions, _ = load_questions("facts", limit=n, seed=5)
    chunks = rf.ChunkStore(tmp_path / rf.GENERATION_CHUNKS, "test")
    return run_generate(lm, questions, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False,
                        chunks=chunks, capture_sites=sites)


@pytest.mark.parametrize("batch_size", [1, 16])
def test_features_and_token_scores_read_while_generating_equal_a_separate_pass(default_model, tmp_path, batch_size):
    lm = default_model
    # one at a time, 8 questions (each example is checked at every position; no padding to vary)
    generations = generate(lm, tmp_path, 16 if batch_size > 1 else 8, batch_size, SITES)
    # prompts of different lengths: left padding is exercised at batch size 16
    assert len({len(p) for p in generations.prompt_ids}) > 3
    index = every_position(generations)
    store, missing, separate = one_pass_and_separate(lm, generations, tmp_path, index, SITES)
    assert missing == []  # answers of 24 tokens at most fit the default bound whole
    assert_close(store, separate, FEATURE_TOL)
    sequences = [list(p) + list(a) for p, a in zip(generations.prompt_ids, generations.answer_ids)]
    expected = lm.token_statistics(sequences, [len(p) for p in generations.prompt_ids])
    for prob, entropy, (prob_ref, entropy_ref) in zip(generations.token_prob, generations.token_entropy, expected):
        assert len(prob) == len(prob_ref)
        np.testing.assert_allclose(prob, prob_ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(entropy, entropy_ref, atol=1e-4, rtol=0)


def test_features_of_a_float16_model(tmp_path, model_folder):
    from truthmap.backends.hf import _load

    # the default model's weights as float16, from its folder (a second; the GGUF file takes half a minute),
    # past load_model's cache, which keeps one model: the float32 model stays for the tests after this
    lm = _load(str(model_folder), "float16", "cpu", None, False, None)
    assert lm.model.dtype == torch.float16
    generations = generate(lm, tmp_path, 8, 8, ["residual"], max_new_tokens=12)
    store, missing, separate = one_pass_and_separate(lm, generations, tmp_path, every_position(generations),
                                                     ["residual"])
    assert missing == []
    assert_close(store, separate, FEATURE_TOL_HALF)


def test_the_bound_holds_long_answers_and_the_rest_is_read_again(default_model, tmp_path, monkeypatch):
    """A bound that holds 1 + 12 slots of a batch of 8: answers of up to 40 tokens keep their first 4 and
    last 8 tokens; a position between them is read by the separate pass, with the same result."""
    lm = default_model
    budget = 13 * bytes_per_slot(lm, ["residual"], 8)
    held = []
    original = BatchCapture.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        held.append(sum(t.numel() * t.element_size() for t in self.states.values()))

    monkeypatch.setattr("truthmap.backends.hf.BatchCapture.__init__", spy)
    monkeypatch.setattr("truthmap.stages.capture.CAPTURE_BYTES", budget)
    generations = generate(lm, tmp_path, 8, 8, ["residual"], max_new_tokens=40)
    assert held and max(held) <= budget  # every batch held its states within the bound
    n_answer = np.array([len(a) for a in generations.answer_ids])
    n_prompt = np.array([len(p) for p in generations.prompt_ids])
    assert (n_answer > 12).sum() >= 2  # some answers are longer than what is held
    # the heatmap's kinds of position: last prompt token, first two, last eight, and one in the middle
    index = np.stack([n_prompt - 1, n_prompt, n_prompt + 1, n_prompt + n_answer // 2]
                     + [n_prompt + n_answer - k for k in range(8, 0, -1)], axis=1)
    index[index < n_prompt[:, None] - 1] = -1
    store, missing, separate = one_pass_and_separate(lm, generations, tmp_path, index, ["residual"])
    middle_not_held = [i for i in range(len(n_answer)) if 4 <= n_answer[i] // 2 < n_answer[i] - 8]
    assert missing == middle_not_held and missing  # exactly the answers whose middle token was not held
    for site in store:  # what the separate pass fills in, as extract does
        store[site][:, :, missing, :] = separate[site][:, :, missing, :]
    assert_close(store, separate, FEATURE_TOL)


def test_both_p_true_variants_in_one_pass_equal_a_pass_each(default_model):
    questions = ["What is the capital of France?", "Who wrote Hamlet?", "What is 2+2?", "Which planet is largest?"]
    exact = ["Paris", "Shakespeare", None, "Jupiter"]
    whole = ["The capital of France is Paris.", "It was written by William Shakespeare.", "2+2 is 4.", None]
    together = p_true_variants(default_model, questions, [exact, whole], batch_size=3)
    np.testing.assert_allclose(together[0], p_true(default_model, questions, exact), atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(together[1], p_true(default_model, questions, whole), atol=1e-5, equal_nan=True)
    assert np.isnan(together[0, 2]) and np.isnan(together[1, 3]) and not np.isnan(together[:, :2]).any()
    # one question alone (nothing shared with another question), and batches of uneven suffix lengths
    alone = p_true_variants(default_model, questions[:1], [exact[:1], whole[:1]])
    np.testing.assert_allclose(alone[:, 0], together[:, 0], atol=1e-5)
    wide = p_true_variants(default_model, questions, [exact, whole], batch_size=4)
    np.testing.assert_allclose(wide, together, atol=1e-5, equal_nan=True)
    # one variant (the default): each prompt's end runs after the shared head in one pass
    single = p_true_variants(default_model, questions, [whole], batch_size=3)
    np.testing.assert_allclose(single[0], together[1], atol=1e-5, equal_nan=True)


def test_a_batch_computes_what_its_prompts_share_once(default_model):
    """Generation runs the beginning a batch's prompts share (the chat template's system turn …) once and
    lets its KV cache serve every row: the same greedy answers as one prompt at a time, with fewer prompt
    tokens through the model."""
    from truthmap.backends.base import build_prompt, encode_prompt
    from truthmap.backends.hf import answer_prompts, common_prefix

    lm = default_model
    questions = ["What is the capital of Peru?", "Who painted the Mona Lisa?", "What is the largest ocean?",
                 "In which year did the Berlin Wall fall?", "What is the chemical symbol of gold?"]
    prompts = [encode_prompt(lm.tokenizer, build_prompt(lm.tokenizer, q)) for q in questions]
    head = common_prefix(prompts)
    assert head >= 10  # the chat template's system turn, at least
    seen = []
    hook = lm.embeddings.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        together, _ = answer_prompts(lm, prompts, 12, 5, lm.end_of_turn_ids())
        prefill = [shape for shape in seen if shape[1] > 1]
        alone = [answer_prompts(lm, [p], 12, 1, lm.end_of_turn_ids())[0][0] for p in prompts]
    finally:
        hook.remove()
    assert together == alone
    # the batch's prefill: the head once, then the rows' own ends (left-padded to the longest)
    assert prefill[0] == (1, head) and prefill[1] == (5, max(len(p) for p in prompts) - head)
