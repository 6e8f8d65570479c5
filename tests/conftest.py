"""Shared fixtures: the embedded default model, loaded once per test session."""

import pytest


@pytest.fixture(scope="session")
def default_model():
    from truthmap.backends.hf import load_model

    return load_model(dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def model_folder(default_model, tmp_path_factory):
    """The default model saved as a Hugging Face folder: the same float32 weights (dequantised), tokenizer,
    chat template and generation config, so the same answers; a process loads it in about a second, where
    reading and dequantising the GGUF file takes about 30 s. For the tests that start processes or Ray
    workers to test something other than loading (kills and resumes, workers); a run of it records the
    revision "local"."""
    import copy

    from safetensors.torch import save_model

    folder = tmp_path_factory.mktemp("model") / "smollm2-135m-instruct"
    folder.mkdir()
    config = copy.deepcopy(default_model.model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights saved are the dequantised ones
    config.save_pretrained(folder)
    default_model.model.generation_config.save_pretrained(folder)
    default_model.tokenizer.save_pretrained(folder)
    save_model(default_model.model, str(folder / "model.safetensors"))  # the tied embedding once
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded default model's tokenizer alone: unit tests of grading and positions load no weights."""
    from truthmap.backends.hf import load_tokenizer

    return load_tokenizer()


# One small whole study, shared by the model-backed tests that read a run folder (the end-to-end
# contract, the report in a browser), so the suite runs the model over these questions only once.
SMALL_STUDY = dict(limit=80, seeds=[0, 1], test_fraction=0.3, validation_fraction=0.2, min_per_class=4, bootstrap=200,
                   progress=False)


@pytest.fixture(scope="session")
def small_study_settings():
    """The arguments of ``truthmap.run`` that made ``small_study`` (to rerun it, or to check expectations)."""
    return dict(SMALL_STUDY)


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """(run folder, AUC table) of ``truthmap.run(**SMALL_STUDY)``: tests read the folder; one that
    changes a file puts it back as it was (copy the folder to change it for good)."""
    import truthmap

    out = tmp_path_factory.mktemp("run") / "study"
    return out, truthmap.run(out=str(out), **SMALL_STUDY)
