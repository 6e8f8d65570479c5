"""Fuzzing every reader of a run folder (hypothesis, no model): manifests, configs, summaries, splits,
activation indexes and detector cards holding any JSON value (NaN, lone surrogates, deep nesting, wrong
types, paths out of the folder), or random bytes, give a result or a one-line TruthmapError; never another
exception, and never a change to a file outside the folder."""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _synthetic import make_run, seal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from truthmap import runfolder as rf
from truthmap.errors import TruthmapError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["../../outside/thesis.txt", "/etc/passwd", "residual", "-1", "\ud800",
                                           "\x1b[2J", "residual/shard-00000.npy", "0" * 64]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["model", "dataset", "files", "version", "seeds", "train", "test", "ids", "positions", "sites", "residual",
         "layers", "shards", "file", "start", "stop", "size", "sha256", "stage", "previous", "best_cell", "site",
         "layer", "position", "top_cells", "auc", "auc_lo", "threshold", "C", "trust_remote_code", "ray",
         "answers.parquet", "../x"]), inner, max_size=5)), max_leaves=20)


def _text(value, raw: bytes, how: int) -> bytes:
    """A JSON text of ``value``, raw bytes, or deep nesting."""
    if how == 0:
        return raw
    if how == 1:
        return b"[" * 3000 + b"]" * 3000
    return json.dumps(value, allow_nan=True).encode("utf-8", "surrogatepass")


_BASE = {}


def _base() -> Path:
    """One synthetic, sealed run folder, copied for each example."""
    if "run" not in _BASE:
        import atexit

        folder = Path(tempfile.mkdtemp(prefix="fuzz-base-"))
        atexit.register(shutil.rmtree, folder, True)  # removed when the test session ends
        _BASE["run"] = make_run(folder / "run", n=24)
    return _BASE["run"]


def _with(name: str, data: bytes, sealed: bool):
    """(sandbox, run folder) whose ``name`` holds ``data`` (listed in the manifest if ``sealed``), and a
    canary file outside it."""
    sandbox = Path(tempfile.mkdtemp(prefix="fuzz-"))
    (sandbox / "outside").mkdir()
    (sandbox / "outside" / "thesis.txt").write_text("years of work")
    run = sandbox / "run"
    shutil.copytree(_base(), run)
    (run / name).write_bytes(data)
    if sealed:
        seal(run)
    return sandbox, run


def _clear(call) -> None:
    """``call()`` returns, or raises TruthmapError (the CLI prints it as one line); anything else fails."""
    try:
        call()
    except TruthmapError as err:
        assert str(err).strip() and "Traceback" not in str(err)
    finally:
        assert not rf.open_runs()  # every run opened for the call was closed, however it ended


@FUZZ
@given(value=VALUES, raw=st.binary(max_size=64), how=st.integers(0, 4))
def test_any_manifest_opens_clearly_and_touches_nothing_outside(value, raw, how):
    sandbox, run = _with("manifest.json", _text(value, raw, how), False)
    try:
        def open_and_close():
            with rf.open_run(run):
                pass

        _clear(open_and_close)
        assert (sandbox / "outside" / "thesis.txt").read_text() == "years of work"
    finally:
        shutil.rmtree(sandbox)


@FUZZ
@given(value=VALUES, raw=st.binary(max_size=64), how=st.integers(0, 4), sealed=st.booleans())
def test_any_saved_config_is_continued_clearly_and_never_widens_trust(value, raw, how, sealed):
    from truthmap.config import Config
    from truthmap.pipeline import continue_config

    sandbox, run = _with("config.json", _text(value, raw, how), sealed)
    try:
        def continued():
            with rf.open_run(run):
                config = continue_config(Config(out=str(run)), run, frozenset({"out"}), ("probe",))
                assert config.trust_remote_code is False and config.ray is None and config.device_map is None

        _clear(continued)
    finally:
        shutil.rmtree(sandbox)


@FUZZ
@given(value=VALUES, raw=st.binary(max_size=64), how=st.integers(0, 4))
def test_any_summary_is_read_clearly(value, raw, how):
    from truthmap.cli import _report
    from truthmap.analyses.resample import default_cell

    if isinstance(value, dict) and how > 1 and "best_cell" not in value:
        value = {**value, "best_cell": value}
    sandbox, run = _with("summary.json", _text(value, raw, how), True)
    try:
        _clear(lambda: _report(run))
        _clear(lambda: default_cell(run))
    finally:
        shutil.rmtree(sandbox)


@FUZZ
@given(value=VALUES, raw=st.binary(max_size=64), how=st.integers(0, 4))
def test_any_splits_are_read_clearly(value, raw, how):
    from truthmap.analyses.detector import split_ids

    if how > 1:
        value = {"seeds": {"0": value}} if not isinstance(value, dict) else value
    sandbox, run = _with("splits.json", _text(value, raw, how), True)
    try:
        _clear(lambda: split_ids(run, 0))
    finally:
        shutil.rmtree(sandbox)


@FUZZ
@given(value=VALUES, raw=st.binary(max_size=64), how=st.integers(0, 4), shard=SCALARS)
def test_any_activation_index_is_read_clearly_and_never_leaves_the_folder(value, raw, how, shard):
    from truthmap.stages.extract import load_features

    index = json.loads((_base() / "activations" / "index.json").read_text())
    if how == 4:  # a well-formed index whose shard file is any value
        index["sites"]["residual"]["shards"][0]["file"] = shard
        data = json.dumps(index, allow_nan=True).encode("utf-8", "surrogatepass")
    else:
        data = _text(value, raw, how)
    sandbox, run = _with("activations/index.json", data, True)
    np.save(sandbox / "outside" / "array.npy", np.ones((3, 2, 24, 8), np.float16), allow_pickle=False)
    try:
        _clear(lambda: load_features(run, "residual", 1, "-1"))
    finally:
        shutil.rmtree(sandbox)


@FUZZ
@given(value=VALUES, raw=st.binary(max_size=64), how=st.integers(0, 4))
def test_any_detector_card_loads_clearly(value, raw, how):
    from safetensors.numpy import save_file

    from truthmap.analyses.detector import Detector

    folder = Path(tempfile.mkdtemp(prefix="fuzz-card-"))
    try:
        save_file({"mean": np.zeros(3, np.float32), "scale": np.ones(3, np.float32), "coef": np.ones(3, np.float32),
                   "intercept": np.zeros(1)}, str(folder / "detector.safetensors"))
        (folder / "card.json").write_bytes(_text(value, raw, how))
        _clear(lambda: Detector.load(folder))
    finally:
        shutil.rmtree(folder)
