"""Shared fixtures: the embedded default model, loaded once per test session."""

import pytest


@pytest.fixture(scope="session")
def default_model():
    from truthmap.models import load_model

    return load_model(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model.tokenizer
