"""The names of truthmap before the backends wing, kept for code outside the package: the backend
contract and its factory now live in :mod:`truthmap.backends` (nothing inside truthmap imports this module)."""

from .backends import ModelBackend, Models  # noqa: F401
