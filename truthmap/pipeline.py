"""Runs the stages in order over one run folder, skipping those whose inputs have not changed.

    questions ─> generate ─> label ─> extract (─> samples) ─> probe ─> wholemap ─> baselines (─> entropy) (─> attention) ─> cost
              ─> plot ─> report

Every stage declares itself in its own module (``register(Stage(...))``, truthmap/stages/base.py): its
step (the order), the function that runs it, the run-folder files it reads (its fingerprint, with its
settings) and the files it writes — each file written by exactly one stage (runfolder/names.py names them) —
and whether it needs the model: ``workers`` (on Ray workers with ``--ray``, otherwise in this process)
or ``here`` (in this process). The imports below are what registers them; ``STAGE_TABLE`` is the
registry in step order. The model is loaded at most once, and only if a stage that needs it has to run.

``samples`` and ``entropy`` (truthmap/analyses/entropy.py) run with ``--also samples``, and always in a study
without gold answers, where the stages that need correctness labels (``labelled``) are skipped.

An optional analysis (``optional``: the whole map, cost, the entropy probe, attention) that cannot run on
this data raises :class:`~truthmap.errors.CannotRun`; a run of several stages then skips it with one line
on stderr, records why in summary.json ``skipped`` ({stage: reason}; the entry goes when the stage next
runs), removes its outputs of an earlier run, and goes on. Asked for alone (``truthmap entropy``) it is an error.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import numpy as np

from . import runfolder as rf
from .backends import Models
from .config import OUTSIDE, SETTINGS, Config, make_config
from .errors import CannotRun, TruthmapError
from .stages.base import Stage, StageRun, in_order
from .stages.generate import forget_preflight, preflight
from .stages.label import has_labels

# each stage module registers its stage(s) when imported (generate and label above); a new stage's module is
# named on one of these lines. The order they run in is their declared step, not the order of these imports.
from .stages import extract, probe, baselines, plot, report  # noqa: E402,F401
from .analyses import entropy, wholemap, attention, cost  # noqa: E402,F401


def run_stage(stage: Stage, config: Config, run: rf.Run, models: Models | None = None, force: bool = False) -> bool:
    """Run ``stage`` in the open ``run`` unless it is current; record its fingerprint and time. True if it ran."""
    inputs = list(stage.inputs) + [Path(p).absolute() for p in (stage.sources(config) if stage.sources else [])]
    stamp = run.fingerprint(stage.settings(config), inputs)
    if not force and run.is_current(stage.name, stamp, stage.outputs):
        return False
    # until it finishes, the stage's old outputs are not current; then it is marked done, and timed
    with run.stage(stage.name, fingerprint=stamp):
        stage.run(StageRun(config, run.root, models, stamp, force, run))
    return True


STAGE_TABLE: dict[str, Stage] = in_order()  # every registered stage, in the order a run takes them
STAGES = tuple(STAGE_TABLE)
MODEL_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.model)  # stages that may need the model
LABELLED_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.labelled)  # need graded answers
RAY_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.model == "workers")  # on Ray with --ray


def versions() -> dict:
    from importlib.metadata import version

    import pyarrow
    import sklearn
    import torch

    from .constants import __version__

    return {"python": platform.python_version(), "truthmap": __version__, "torch": torch.__version__,
            "transformers": version("transformers"), "numpy": np.__version__, "scikit-learn": sklearn.__version__,
            "pyarrow": pyarrow.__version__, "platform": platform.platform(),
            # CPU results depend on the thread count (it changes the order of float sums)
            "torch_threads": torch.get_num_threads()}


def run_stages(config: Config, stages: tuple[str, ...] = STAGES, force: bool = False,
               given: frozenset | None = None) -> Path:
    """Run ``stages`` of the study described by ``config``; return the run folder.

    ``given``: the settings the user gave (command line): the others are continued from the folder's
    saved config.json, read only once the folder is locked and checked, and never those of
    TRUST_SETTINGS (see :func:`continue_config`). None: ``config`` is used as it is.
    """
    run_dir = config.run_dir()
    try:
        rf.check_run_folder(run_dir)  # a folder that is not a run folder is the first thing said
        if "generate" in stages and not any((run_dir / name).exists() for name in (rf.MANIFEST, rf.CONFIG)):
            preflight(config)  # a new run: what can be refused is refused before the folder is made
        with rf.Run.open(run_dir) as run:  # one writer; damaged files are found, named and recomputed
            for notice in run.notices:
                print(f"truthmap: {rf.sanitise(notice, 1000)}", file=sys.stderr)
            if given is not None:
                config = continue_config(config, run, given, stages)
            _run_stages(config, run, stages, force)
    finally:
        forget_preflight()
    return run_dir


# settings that decide what code runs and where: only ever from the command line or --config FILE
TRUST_SETTINGS = ("model", "trust_remote_code", "ray", "device_map", "extractor_model")
# settings naming what a stage reads from outside the run folder (the schema's ``outside``): never continued
_NOT_CONTINUED = tuple(dict.fromkeys(TRUST_SETTINGS + OUTSIDE + ("progress",)))


def saved_config(run_dir: Path | rf.Run) -> dict:
    """The run folder's config.json if the manifest vouches for it (the open Run, or the Run this process
    holds for the folder: :func:`truthmap.runfolder.at`), else {}."""
    run = rf.at(run_dir)
    if not run.trusted(rf.CONFIG):
        return {}
    try:
        saved = run.read_json(rf.CONFIG)
    except TruthmapError as err:
        print(f"truthmap: {err}; its settings are not continued", file=sys.stderr)
        return {}
    return saved if isinstance(saved, dict) else {}


def continue_config(config: Config, run_dir: Path | rf.Run, given: frozenset, stages: tuple[str, ...]) -> Config:
    """``config`` with the settings the user did not give taken from the run's saved config.json.

    Saved settings never choose what is read or run: those naming something outside the folder (the
    model, the dataset, its data folder, the extractor, a Ray cluster) and those of TRUST_SETTINGS are
    never taken from the folder. A model or dataset other than the run's is refused unless given where a
    stage would read it (a stage that does not only names the run's model and dataset in its titles); a
    trust setting that differs is said on stderr. The continued values are checked by the schema: a bad
    one is a one-line error naming config.json and the setting.
    """
    saved = saved_config(run_dir)
    if not saved:
        return config
    run_dir = rf.at(run_dir).root
    values = config.to_dict()
    continued = {k: v for k, v in saved.items() if k in SETTINGS and k not in given and k not in _NOT_CONTINUED}
    values.update(continued)
    reads = {"model": bool(set(stages) & set(MODEL_STAGES)), "dataset": "generate" in stages,
             "data_dir": "generate" in stages and "dataset" not in given}  # a dataset given anew: its folder too
    for name, needed in reads.items():
        was = saved.get(name)
        if name in given or not isinstance(was, str) or was == values[name]:
            continue  # (a saved value of another type is the schema's to refuse, below, if it were continued)
        if needed:
            flag = "--" + name.replace("_", "-")
            raise TruthmapError(f"{run_dir}: this run had {name} {rf.sanitise(repr(was), 200)}; give {flag} "
                                f"{rf.sanitise(str(was), 200)} to continue it (a {name.replace('_', ' ')} is never "
                                f"taken from a run folder)")
        if name != "data_dir":
            values[name] = was  # only named in titles: no stage here reads it
    extractor = saved.get("extractor_model")
    if "extractor_model" not in given and extractor in ("none", values["model"]):
        values["extractor_model"] = extractor  # no extractor, or the studied model: nothing more is loaded
    for name in TRUST_SETTINGS[1:]:
        if name == "ray" and not set(stages) & set(RAY_STAGES):
            continue  # the other stages, and the analyses, run the model in this process
        if name in saved and saved[name] != values[name] and name not in given:
            print(f"truthmap: {run_dir / rf.CONFIG}: this run had {name} = {rf.sanitise(repr(saved[name]), 80)}; "
                  f"not taken from the folder (now {values[name]!r}; give it on the command line or in --config)",
                  file=sys.stderr)
    source = str(run_dir / rf.CONFIG)
    try:
        return make_config(values, source, {name: "the command line" for name in given})
    except TruthmapError as err:
        if str(err).startswith(source):
            raise TruthmapError(f"{err}; give the setting on the command line or rerun the run") from None
        raise


def _run_stages(config: Config, run: rf.Run, stages: tuple[str, ...], force: bool) -> None:
    run_dir = run.root
    saved = saved_config(run)
    if saved and "generate" not in stages and saved.get("model") != config.model:
        raise TruthmapError(f"{run_dir}: this run studied model '{rf.sanitise(saved.get('model'))}', not '{config.model}'")
    run.write_json(rf.CONFIG, config.to_dict())
    run.update_summary(versions=versions(), config=config.to_dict())
    started = time.perf_counter()
    workers = Models(config, on_workers=True)  # on Ray workers with --ray (generate, label, extract)
    # with Ray, the other model stages load the model here, in the driver (loaded only if they run)
    here = Models(config) if config.ray else workers
    try:
        for name in stages:
            stage = STAGE_TABLE[name]
            if stage.labelled and not _labelled(run):
                continue  # a label-free study: no correctness to probe, score or draw (summary.json says so)
            if stage.when is not None and not stage.when(config, run_dir):
                continue  # an optional stage that was not asked for
            try:
                run_stage(stage, config, run, {"workers": workers, "here": here}.get(stage.model), force)
            except CannotRun as err:
                # a label-free study has nothing but the entropy probe: there it is the study, not an extra
                if not (stage.optional and len(stages) > 1 and _labelled(run)):
                    raise
                skip_stage(stage, run, str(err))
            else:
                note_skipped(run, name, None)
    finally:
        workers.close()
        here.close()
    run.update_summary(wall_seconds=round(time.perf_counter() - started, 2))


def skip_stage(stage: Stage, run: rf.Run, reason: str) -> None:
    """Leave out an optional analysis that cannot run on this data: say why (stderr and summary.json
    ``skipped``) and remove its outputs of an earlier run, which no longer describe this one."""
    print(f"truthmap: {stage.name} skipped: {rf.sanitise(reason, 1000)}", file=sys.stderr)
    for name in stage.outputs:
        if run.trusted(name):
            run.remove(name)
    stale = run.stages().get(stage.name, {}).get("summary")  # its summary fields of that earlier run
    run.forget(stage.name)
    note_skipped(run, stage.name, reason, drop=tuple(stale) if isinstance(stale, dict) else ())


def note_skipped(run: rf.Run, name: str, reason: str | None, drop: tuple[str, ...] = ()) -> None:
    """Set (or, with None, clear) summary.json ``skipped[name]``; remove the summary fields ``drop``."""
    summary = run.read_json_object(rf.SUMMARY, default={}) if run.trusted(rf.SUMMARY) else {}
    skipped = summary.get("skipped") if isinstance(summary.get("skipped"), dict) else {}
    if reason is None and name not in skipped:
        return
    if reason is None:
        del skipped[name]
    else:
        skipped[name] = reason
    summary["skipped"] = skipped
    for key in drop:
        summary.pop(key, None)
    run.write_json(rf.SUMMARY, summary)


def _labelled(run: rf.Run) -> bool:
    """False only for a run whose answers exist and carry no gold labels."""
    return not run.path(rf.ANSWERS).exists() or has_labels(run.read_parquet(rf.ANSWERS))

