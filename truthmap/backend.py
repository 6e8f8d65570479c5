"""The model backend contract: what the stages ask of a model, wherever it runs, and the one factory
that gives a command its models.

Two backends implement :class:`ModelBackend`:

* :class:`truthmap.models.LoadedModel` — the weights in this process (``in_process`` true): forward
  hooks, sampled answers and the one-pass capture work on it, and so do the analyses that read hidden
  states or token probabilities directly (baselines, attention, samples, resample, choose, detectors);
* :class:`truthmap.distributed.RemoteModel` — the model held by Ray workers (``in_process`` false):
  the driver has the tokenizer and the model's config, no weights; answers and feature shards are
  computed on the workers, chunk by chunk.

:class:`Models` is the factory: ``Models(config, on_workers=True)`` gives the Ray pool when
``config.ray`` is set (the generate, label and extract stages of the pipeline); every other use —
the other stages, and every command that analyses a finished run — gets the model in this process,
whether or not the run was made with ``--ray`` (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .config import Config


@runtime_checkable
class ModelBackend(Protocol):
    """What the stages need of the studied model."""

    tokenizer: object
    model: object  # in this process: the transformers model; on workers: its config and generation config
    model_id: str
    revision: str  # commit hash, sha256 prefix of a GGUF file, or "local"
    n_layers: int
    hidden_size: int
    in_process: bool  # the weights are here: hooks, sampling and the one-pass capture are possible

    def describe(self) -> str:
        """One line for messages: the model and where it runs."""

    def auto_batch_size(self, longest: int) -> int:
        """A first batch size for sequences of ``longest`` tokens."""

    def answer_chunks(self, jobs: dict, max_new_tokens: int, batch_size: int, bar=None, sample=None,
                      capture=None) -> Iterator[tuple[int, list]]:
        """(k, [(answer ids, stopped), …]) for each chunk ``k -> prompt ids`` of ``jobs``, in any order;
        each chunk in consecutive batches of ``batch_size``. ``sample`` (k -> the chunk's
        :class:`truthmap.stages.generate.Draws`) and ``capture`` need ``in_process``."""

    def feature_shards(self, jobs: dict, positions: list[str], sites: list[str], batch_size: int,
                       bar=None) -> Iterator[tuple[int, dict]]:
        """(k, site -> float16 ``[R, P, n, d]``) for each shard ``k -> (sequences, index, ids)``, in any order."""

    def close(self) -> None:
        """Release what the backend started (Ray workers); the model is not used afterwards."""


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
                from .distributed import start_workers

                self._lm = start_workers(c)
            else:
                from .models import load_model

                with _quiet(not c.progress):
                    self._lm = load_model(c.model, c.dtype, c.device, c.device_map, c.trust_remote_code)
        return self._lm

    def check(self) -> None:
        """Fail now, in one line, if the studied model cannot be found, before a stage's other work (the
        model itself is loaded on first use). A model on Ray workers is found by the workers."""
        if self._lm is None and not (self.on_workers and self.config.ray):
            from .models import check_model

            check_model(self.config.model, self.config.trust_remote_code)

    @property
    def extractor(self) -> ModelBackend | None:
        """None with ``extractor_model = "none"``; the studied model when it is the extractor."""
        name = self.config.extractor_model
        if name == "none":
            return None
        if name is None or name == self.config.model:
            return self.lm
        if self._extractor is None:
            from .models import load_model

            c = self.config
            with _quiet(not c.progress):
                self._extractor = load_model(name, c.dtype, c.device, None, c.trust_remote_code)
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
