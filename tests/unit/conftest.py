"""Fixtures shared by the model-free unit tests."""

import pytest

from truthmap.backends import hf
from truthmap.stages import generate


@pytest.fixture
def fake_generation(monkeypatch):
    """Generation without a model: each answer depends on its batch (which catches regrouping); the
    batches generated are recorded in the returned list."""
    batches = []

    def fake_batch(lm, batch, max_new_tokens, stop_ids, sample=None, capture=None):
        batches.append([tuple(p) for p in batch])
        return [([sum(p) % 97, len(batch)], True) for p in batch]

    monkeypatch.setattr(hf, "_generate_batch", fake_batch)
    monkeypatch.setattr(generate, "prompt_room", lambda lm, n: 50)
    monkeypatch.setattr(hf.LoadedModel, "end_of_turn_ids", lambda lm: [1])
    return batches


@pytest.fixture(scope="session")
def facts_questions():
    """(questions, vocabularies) of the built-in facts task, built once (about 3 s a build); tests read
    them and must not change them in place."""
    from truthmap.data import load_questions

    return load_questions("facts")
