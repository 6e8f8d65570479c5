"""The stage registry: every stage of a run declares itself here, in its own module, as tasks do.

A stage is one :class:`Stage` entry, registered where the stage's code is (``register(Stage(...))`` at
the bottom of stages/probe.py, analyses/wholemap.py, …): its name, the step it is in the study (which
orders the stages: ``"4"`` runs before ``"4a"``, before ``"5"``), a line of help for its command, the
function that runs it, the run-folder files it reads (with its settings, its fingerprint) and those it
writes (no other stage writes them; runfolder/names.py names them), and whether it needs the model.
pipeline.py runs the registered stages in step order; the CLI makes one command per stage from the same
entries. Adding a stage: a module that ends in ``register(Stage(...))`` and one import line in
pipeline.py (docs/extending.md walks through it).

Reads and writes nothing itself; a stage's ``run`` is given a :class:`StageRun`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the model backend is only named here, in types
    from ..backends import Models
    from ..config import Config
    from ..runfolder import Run


@dataclass(frozen=True)
class StageRun:
    """What a stage's function is given."""

    config: Config
    run_dir: Path
    models: Models | None  # None for a stage that needs no model
    stamp: str  # the stage's fingerprint (settings + inputs)
    force: bool  # --force: recompute, keeping nothing of an earlier, interrupted run
    run: Run  # the open run folder (run_dir is its root): read and write its files through it


@dataclass(frozen=True)
class Stage:
    """One stage of a run, as it declares itself."""

    name: str  # its command (`truthmap NAME`) and its entry in stages.json
    step: str  # its place in the study: a digit and an optional letter ("4", "4a"); stages run in this order
    help: str  # one line for `truthmap NAME --help` (what it does and the files it writes)
    run: Callable[[StageRun], None]  # writes ``outputs`` (and summary.json fields)
    inputs: tuple[str, ...]  # run-folder files and folders it reads; with ``settings``, its fingerprint
    outputs: tuple[str, ...]  # the files it writes; no other stage writes them
    settings: Callable[[Config], dict]  # the settings its outputs depend on
    model: str | None = None  # None, "here" (this process) or "workers" (Ray workers with --ray)
    labelled: bool = False  # needs graded answers: skipped in a study without gold answers
    when: Callable[[Config, Path], bool] | None = None  # an optional stage runs only when this says so
    sources: Callable[[Config], list[Path]] | None = None  # files outside the run folder it reads
    optional: bool = False  # an analysis the rest does not need: skipped (CannotRun) in a labelled study
    also: bool = False  # a pass `truthmap run` makes with --also NAME; its command asks for it by name
    summary: bool = False  # its command prints the run's summary after it (a stage that changes the findings)


REGISTRY: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the registry (a name may be registered once)."""
    if stage.name in REGISTRY:
        raise ValueError(f"stage '{stage.name}' is registered twice")
    REGISTRY[stage.name] = stage
    return stage


def in_order() -> dict[str, Stage]:
    """The registered stages in the order a run takes them: by ``step``."""
    return dict(sorted(REGISTRY.items(), key=lambda item: _step_key(item[1].step)))


def _step_key(step: str) -> tuple[int, str]:
    digits = step.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits), step[len(digits):]


def fields(*names: str) -> Callable[[Config], dict]:
    """A stage's ``settings``: the values of these Config fields."""
    return lambda c: {name: getattr(c, name) for name in names}


def short_model(model: str) -> str:
    """The model's name in a figure title (no ``embedded:`` prefix or GGUF file part)."""
    return model.replace("embedded:", "").split("::")[-1]
