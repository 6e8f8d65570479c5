"""The names of truthmap before the backends wing, kept for code outside the package: the Hugging Face
backend now lives in :mod:`truthmap.backends.hf` (nothing inside truthmap imports this module)."""

from .backends.base import resolve_device  # noqa: F401
from .backends.hf import LoadedModel, check_model, load_model, load_tokenizer, resolve_model  # noqa: F401
from .constants import DEFAULT_MODEL, SITES  # noqa: F401
