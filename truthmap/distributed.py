"""The names of truthmap before the backends wing, kept for code outside the package: the Ray backend now
lives in :mod:`truthmap.backends.ray` (nothing inside truthmap imports this module)."""

from .backends.ray import MAX_RESTARTS, RemoteModel, Workers, import_ray, start_workers  # noqa: F401
