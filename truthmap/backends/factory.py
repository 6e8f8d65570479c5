"""The factory: the one place that decides which backend a command gets, from its settings.

``Models(config, on_workers=True)`` gives the Ray pool (ray.py) when ``config.ray`` is set (the
generate, label and extract stages of the pipeline); every other use — the other stages, and every
command that analyses a finished run — gets the Hugging Face model in this process (hf.py), whether or
not the run was made with ``--ray`` (docs/scaling.md). A new engine is one more branch of
:attr:`Models.lm` (docs/extending.md).

The backends are imported on first use: torch and transformers load only when a model does.
"""

from __future__ import annotations

import contextlib
import io

from ..config import Config
from .base import ModelBackend


class Models:
    """The models of one command, each loaded on first use: the studied model (:attr:`lm`) and the
    model that extracts exact answers (:attr:`extractor`).

    ``on_workers``: the studied model lives on Ray workers when ``config.ray`` is set (the driver keeps
    its tokenizer and config). Otherwise — and always for analyses of a finished run — it is loaded in
    this process. Use as a context manager, or call :meth:`close`, to stop the workers.
    """

    def __init__(self, config: Config, *, on_workers: bool = False):
        self.config, self.on_workers = config, on_workers
        self._lm: ModelBackend | None = None
        self._extractor = None

    @property
    def lm(self) -> ModelBackend:
        if self._lm is None:
            c = self.config
            if self.on_workers and c.ray:
                from . import ray

                self._lm = ray.start_workers(c)
            else:
                from . import hf

                with _quiet(not c.progress):
                    self._lm = hf.load_model(c.model, c.dtype, c.device, c.device_map, c.trust_remote_code)
        return self._lm

    def check(self) -> None:
        """Fail now, in one line, if the studied model cannot be found, before a stage's other work (the
        model itself is loaded on first use). A model on Ray workers is found by the workers."""
        if self._lm is None and not (self.on_workers and self.config.ray):
            from . import hf

            hf.check_model(self.config.model, self.config.trust_remote_code)

    @property
    def extractor(self) -> ModelBackend | None:
        """None with ``extractor_model = "none"``; the studied model when it is the extractor."""
        name = self.config.extractor_model
        if name == "none":
            return None
        if name is None or name == self.config.model:
            return self.lm
        if self._extractor is None:
            from . import hf

            c = self.config
            with _quiet(not c.progress):
                self._extractor = hf.load_model(name, c.dtype, c.device, None, c.trust_remote_code)
        return self._extractor

    def close(self) -> None:
        if self._lm is not None:
            self._lm.close()

    def __enter__(self) -> "Models":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def _quiet(quiet: bool):
    """With ``quiet`` (--quiet), the libraries' loading bars (GGUF conversion, weights) are not shown: they
    write to stderr, which is held for the block. A failure still raises, and says why."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
