"""Stage 3 — hidden states at the chosen positions, every layer, one batched forward pass.

With a capture of the generation (capture.py, the default ``--extract onepass``) the states are copied
from it, and the forward pass runs only over the examples it lacks.

Reads ``answers.parquet`` (position indices) and ``generations.parquet`` (token ids); writes
``activations/``:

* ``index.json`` — ids (row order), positions, hidden size, and per site its layer numbers and shards;
* ``valid.npy`` — bool ``[N, P]``: whether position p exists for example n;
* ``<site>/shard-00000.npy`` … — float16 ``[R, P, n, d]``: R layer rows of the site, P positions, the n
  examples of that shard (consecutive rows of answers.parquet), hidden size d. Invalid cells hold 0.

Layer rows: residual has rows 0..L (0 = embedding output, l = output of decoder block l); mlp and
attention have rows 1..L (the sub-module's output inside block l). The backend computes them
(``feature_shards``, truthmap/backends/base.py): it keeps only the wanted positions, so nothing of size
tokens × layers is ever held, and features do not depend on the batch size. Shards already on disk are kept, so an interrupted extraction continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import runfolder as rf
from ..backends.base import ModelBackend
from ..errors import TruthmapError
from ..positions import site_rows
from ..runfolder import ACTIVATIONS, ACTIVATIONS_INDEX, ACTIVATIONS_VALID, Run, child, read_activations_index
from .base import Stage, StageRun, fields, register
from .capture import CaptureReader

read_index = read_activations_index  # the name of earlier versions

SHARD_SIZE = 256


def run_extract(
    lm: ModelBackend,
    answers: pd.DataFrame,
    generations: pd.DataFrame,
    positions: list[str],
    sites: list[str],
    run_dir: Path | Run,
    *,
    batch_size: int = 16,
    shard_size: int | None = None,
    progress: bool = True,
    capture=None,
) -> None:
    """Write the activations store for ``answers`` into the run folder ``run_dir`` (a path, or an open
    :class:`~truthmap.runfolder.Run`, read and written through :func:`truthmap.runfolder.at`; see the module
    docstring).

    ``shard_size``: examples per shard (default ``SHARD_SIZE``). ``lm`` is a model backend
    (truthmap/backends/base.py): its ``feature_shards`` computes the missing shards — here, or on Ray
    workers several at once — and each is written here as it arrives.
    ``capture``: a :class:`truthmap.stages.capture.CaptureReader`; the states it holds are copied from it,
    and only the examples it lacks go through the forward pass.
    """
    _write_store(lm, answers, generations, positions, sites, rf.at(run_dir), batch_size, shard_size or SHARD_SIZE,
                 progress, capture)


def _write_store(lm, answers, generations, positions, sites, run: Run | rf.Folder, batch_size, shard_size, progress,
                 capture):
    table = answers[["id"] + [f"pos_{p}" for p in positions]].merge(
        generations[["id", "prompt_ids", "answer_ids"]], on="id", how="left", validate="one_to_one"
    )
    sequences = [list(p) + list(a) for p, a in zip(table.prompt_ids, table.answer_ids)]
    index = table[[f"pos_{p}" for p in positions]].to_numpy(dtype=np.int64)
    ids = table.id.tolist()
    n = len(table)
    shards = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    meta = {
        "ids": ids,
        "positions": positions,
        "hidden_size": lm.hidden_size,
        "dtype": "float16",
        "sites": {
            site: {
                "layers": site_rows(lm, site),
                "shards": [{"file": f"{site}/shard-{k:05d}.npy", "start": a, "stop": b} for k, (a, b) in enumerate(shards)],
            }
            for site in sites
        },
    }
    run.write_npy(ACTIVATIONS_VALID, index >= 0)
    bar = tqdm(total=n, desc="extract", unit="q", disable=not progress)
    todo = []
    for k, (start, stop) in enumerate(shards):
        if all(run.trusted(f"{ACTIVATIONS}/{site}/shard-{k:05d}.npy") for site in sites):  # finished (and intact) before
            bar.update(stop - start)
        else:
            todo.append(k)
    if capture is not None and lm.in_process:  # (on Ray workers whole shards run in parallel instead)
        lengths = (np.array([len(p) for p in table.prompt_ids]), np.array([len(a) for a in table.answer_ids]))
        finished = ((k, _shard_from_capture(lm, capture, sequences, index, ids, lengths, positions, sites, a, b,
                                            batch_size, bar)) for k, (a, b) in ((k, shards[k]) for k in todo))
    else:  # (k, shard) in the order the backend finishes them: here, or on Ray workers
        jobs = {k: (sequences[a:b], index[a:b], ids[a:b]) for k, (a, b) in ((k, shards[k]) for k in todo)}
        finished = lm.feature_shards(jobs, positions, sites, batch_size, bar)
    for k, store in finished:
        for site in sites:
            run.write_npy(f"{ACTIVATIONS}/{site}/shard-{k:05d}.npy", store[site])
    bar.close()
    run.write_json(ACTIVATIONS_INDEX, meta)  # last: the store is whole


def _shard_from_capture(lm, capture, sequences, index, ids, lengths, positions, sites, start, stop, batch_size,
                        bar=None) -> dict[str, np.ndarray]:
    """One shard from the capture of the generation; the examples it lacks are read by the forward pass."""
    n_prompt, n_answer = lengths
    store = {site: np.zeros((len(site_rows(lm, site)), len(positions), stop - start, lm.hidden_size), np.float16)
             for site in sites}
    missing = capture.fill(store, sites, ids[start:stop], n_prompt[start:stop], n_answer[start:stop],
                           index[start:stop])
    if bar is not None:
        bar.update(stop - start - len(missing))
    if missing:
        rows = [start + m for m in missing]
        (_, again), = lm.feature_shards({0: ([sequences[i] for i in rows], index[rows], [ids[i] for i in rows])},
                                        positions, sites, batch_size, bar)
        for site in sites:
            store[site][:, :, missing, :] = again[site]
    capture.read_again += len(missing)
    return store


def load_layer(run_dir: str | Path | Run, site: str, layer: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """All positions of one layer: (ids, positions, features float16 ``[P, N, d]``, valid bool ``[N, P]``).

    ``run_dir``: a run folder or an open :class:`~truthmap.runfolder.Run`. Every file read is checked
    against the run's manifest, under the folder's shared lock (:meth:`Run.reading
    <truthmap.runfolder.Run.reading>`), unless this process already holds the folder."""
    with Run.reading(run_dir) as run:
        run_dir = run.root
        meta = run.read_activations_index()
        if site not in meta["sites"]:
            raise TruthmapError(f"site '{site}': not extracted in {run_dir} (have {sorted(meta['sites'])})")
        layers = meta["sites"][site]["layers"]
        if layer not in layers:
            raise TruthmapError(f"layer {layer}: site '{site}' has layers {layers[0]}..{layers[-1]}")
        row = layers.index(layer)
        parts = []
        for shard in meta["sites"][site]["shards"]:
            path = child(run_dir / ACTIVATIONS, shard["file"], "shard")
            parts.append(run.read_npy(path, mmap_mode="r")[row])
        valid = run.read_npy(ACTIVATIONS_VALID)
        try:
            features = np.concatenate(parts, axis=1)
        except ValueError as err:
            raise TruthmapError(f"{run_dir / ACTIVATIONS}: shards of different shapes ({err}); rerun 'truthmap extract'") from None
        if valid.ndim != 2 or features.ndim != 3 or valid.shape != (len(meta["ids"]), len(meta["positions"])) \
                or features.shape[:2] != (len(meta["positions"]), len(meta["ids"])):
            raise TruthmapError(f"{run_dir / ACTIVATIONS}: the arrays do not match index.json; rerun 'truthmap extract'")
    return meta["ids"], meta["positions"], features, valid


def load_features(run_dir: str | Path | Run, site: str, layer: int, position: str) -> tuple[list[str], np.ndarray]:
    """The example ids and float32 feature matrix ``[n, d]`` of one cell, valid examples only.

    ``site`` is residual / mlp / attention, ``layer`` a layer number (0 = embeddings for residual),
    ``position`` a position name such as ``exact_answer_last`` or ``-1``. Ids match answers.parquet's
    ``id`` column, so a probe can be re-fitted independently with splits.json.
    """
    ids, positions, features, valid = load_layer(run_dir, site, layer)
    if position not in positions:
        raise TruthmapError(f"position '{position}': not extracted (have {positions})")
    p = positions.index(position)
    keep = valid[:, p]
    return [i for i, k in zip(ids, keep) if k], np.asarray(features[p][keep], dtype=np.float32)


# ---------------------------------------------------------------- the stage

def _extract(s: StageRun) -> None:
    c, run = s.config, s.run
    # shards of an interrupted extraction with the same inputs are kept; others are stale
    marker = rf.ACTIVATIONS_FINGERPRINT
    if s.force or (run.path(rf.ACTIVATIONS).exists()
                   and (not run.trusted(marker) or run.path(marker).read_text() != s.stamp)):
        run.remove(rf.ACTIVATIONS)
    if not run.trusted(marker):
        run.write_text(marker, s.stamp)
    answers = run.read_parquet(rf.ANSWERS)
    generations = run.read_parquet(rf.GENERATIONS)
    capture = CaptureReader(run, generations) if c.extract == "onepass" else None
    run_extract(s.models.lm, answers, generations, c.positions, c.sites, run,
                batch_size=c.batch_size or 16, progress=c.progress, capture=capture)
    if capture is not None:
        run.update_summary(extract={"mode": c.extract, "captured": len(capture.where),
                                    "read_again": capture.read_again})


register(Stage(
    "extract", "3", "Hidden states at the positions, every layer (activations/).", _extract,
    inputs=(rf.ANSWERS, rf.GENERATIONS), outputs=(rf.ACTIVATIONS_INDEX,),
    settings=fields("sites", "dtype", "extract"), model="workers"))
