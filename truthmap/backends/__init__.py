"""The backends wing: every line of truthmap that touches a model object, torch's model code or an
inference library lives here, behind one contract.

* ``base.py`` — the contract (:class:`ModelBackend`) and what every backend shares without an inference
  library (capture plan, sampling seeds, layer rows, prompt building);
* ``hf.py`` — Hugging Face transformers in this process (:class:`~truthmap.backends.hf.LoadedModel`);
* ``ray.py`` — the same model on Ray workers (:class:`~truthmap.backends.ray.RemoteModel`);
* ``factory.py`` — :class:`Models`, which gives a command its backends from its settings.

The stages and analyses import from here and call the contract's methods; import-linter keeps the wing
below the stages (pyproject.toml).
"""

from .base import ModelBackend
from .factory import Models

__all__ = ["ModelBackend", "Models"]
