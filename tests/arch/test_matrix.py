"""The architecture matrix: tiny random-weight models of thirteen families, each loaded from a saved
folder by truthmap.backends.hf, in float32 and bfloat16, with and without a chat template, through
generate-with-capture, the separate extraction pass, the token statistics and p(True) — every result
compared with a plain forward pass of the same model (tests/arch/archcheck.py says how, and the
tolerances). Select it with ``-m arch``; it runs in ``make test``."""

from pathlib import Path

import pytest

from archcheck import FAMILIES, FAMILY, Mismatch, check_model, save_tiny_model

pytestmark = pytest.mark.arch


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(family, chat) -> a saved tiny model, made on first use."""
    made = {}

    def folder(family: str, chat: bool) -> Path:
        if (family, chat) not in made:
            made[family, chat] = save_tiny_model(FAMILY[family], chat,
                                                 tmp_path_factory.mktemp(f"{family}-{int(chat)}") / "model")
        return made[family, chat]

    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chat", [False, True], ids=["base", "chat"])
@pytest.mark.parametrize("family", [f.name for f in FAMILIES])
def test_the_study_reads_what_the_model_computes(family, chat, dtype, folders, tmp_path):
    from truthmap.backends.hf import load_model

    lm = load_model(str(folders(family, chat)), dtype, "cpu")
    assert str(lm.model.dtype) == f"torch.{dtype}"
    assert bool(lm.tokenizer.chat_template) == chat
    report = check_model(lm, tmp_path, dtype, additive=FAMILY[family].additive)
    if dtype == "float32":
        assert report["answers parted at near-ties"] == 0


def test_a_family_without_the_capping_fix_is_caught(folders, tmp_path, monkeypatch):
    """Gemma 2's soft-capped logits: reading the LM head's raw output (as truthmap did) gives other token
    probabilities and p(True) than the model's own logits, and the matrix says so."""
    from truthmap.backends.hf import LoadedModel, load_model

    lm = load_model(str(folders("gemma2", False)), "float32", "cpu")
    monkeypatch.setattr(LoadedModel, "head_logits", lambda self, logits: logits)
    with pytest.raises(Mismatch, match="token statistics|p\\(True\\)"):
        check_model(lm, tmp_path, "float32")


def test_residual_row_0_read_from_the_embedding_module_is_caught(folders, tmp_path, monkeypatch):
    """GPT-2 adds learned positions after its token embedding: row 0 read from the embedding module (as
    truthmap did) is not the input of the first block, and the matrix says so."""
    from truthmap.backends.hf import LoadedModel, load_model

    lm = load_model(str(folders("gpt2", False)), "float32", "cpu")
    hook_site = LoadedModel.hook_site

    def from_embeddings(self, site, read):
        if site != "residual":
            return hook_site(self, site, read)

        def blocks_only(row, hidden):
            if row:
                read(row, hidden)

        handles = hook_site(self, site, blocks_only)
        return handles + [self.embeddings.register_forward_hook(lambda _m, _i, output: read(0, output))]

    monkeypatch.setattr(LoadedModel, "hook_site", from_embeddings)
    with pytest.raises(Mismatch, match="residual"):
        check_model(lm, tmp_path, "float32")
