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
attention have rows 1..L (the sub-module's output inside block l). Forward hooks keep only the wanted
positions, so nothing of size tokens × layers is ever held. Sequences are right-padded: with causal
attention a real token never sees the padding after it, so features do not depend on batch size.
The base model is called without its LM head (whose output is never needed).
Shards already on disk are kept, so an interrupted extraction continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import runfolder as rf
from ..errors import TruthmapError
from ..positions import site_rows
from ..models import LoadedModel

if TYPE_CHECKING:
    from ..backend import ModelBackend
from ..runfolder import (ACTIVATIONS, ACTIVATIONS_INDEX, ACTIVATIONS_VALID, child, read_activations_index, read_npy,
                        reading, trusted, write_json, write_npy)
from .base import Stage, StageRun, fields, register
from .capture import CaptureReader

read_index = read_activations_index  # the name of earlier versions

SHARD_SIZE = 256


class _Capture:
    """Forward hooks that copy the hidden state at given token positions into a buffer."""

    def __init__(self, lm: LoadedModel, sites: list[str]):
        self.lm, self.sites, self.handles = lm, sites, []
        self.rows = None  # [B] long, set per batch
        self.cols = None  # [B, P] long
        self.buffers: dict[str, torch.Tensor] = {}

    def __enter__(self):
        for site in self.sites:
            self.handles += self.lm.hook_site(site, self._reader(site))
        return self

    def _reader(self, site):
        def read(row, hidden):
            # [B, T, d] -> [B, P, d]: only the wanted positions leave the model
            self.buffers[site][row] = hidden[self.rows, self.cols].to(self.buffers[site].dtype)

        return read

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@torch.inference_mode()
def extract_batch(lm: LoadedModel, sequences: list[list[int]], index: np.ndarray, sites: list[str]) -> dict:
    """Features of one batch: site -> float32 CPU tensor ``[R, B, P, d]`` (invalid positions read token 0)."""
    device = lm.device
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    with _Capture(lm, sites) as capture:
        capture.rows = torch.arange(len(sequences), device=device)[:, None]
        capture.cols = torch.as_tensor(np.maximum(index, 0), device=device)
        for site in sites:
            n_rows = len(site_rows(lm, site))
            capture.buffers[site] = torch.empty(
                (n_rows, len(sequences), index.shape[1], lm.hidden_size), dtype=torch.float32, device=device
            )
        lm.model.base_model(input_ids=input_ids.to(device), use_cache=False)
    return {site: buf.cpu() for site, buf in capture.buffers.items()}


def run_extract(
    lm: ModelBackend,
    answers: pd.DataFrame,
    generations: pd.DataFrame,
    positions: list[str],
    sites: list[str],
    run_dir: Path,
    *,
    batch_size: int = 16,
    shard_size: int | None = None,
    progress: bool = True,
    capture=None,
) -> None:
    """Write the activations store for ``answers`` (see the module docstring).

    ``shard_size``: examples per shard (default ``SHARD_SIZE``). ``lm`` is a model backend
    (truthmap/backend.py): its ``feature_shards`` computes the missing shards — here, or on Ray workers
    (:class:`truthmap.distributed.RemoteModel`), several at once, with the function used here
    (:func:`extract_shard`) — and each is written here as it arrives.
    ``capture``: a :class:`truthmap.stages.capture.CaptureReader`; the states it holds are copied from it,
    and only the examples it lacks go through the forward pass.
    """
    out = Path(run_dir) / ACTIVATIONS
    shard_size = shard_size or SHARD_SIZE
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
    write_npy(Path(run_dir) / ACTIVATIONS_VALID, index >= 0)
    bar = tqdm(total=n, desc="extract", unit="q", disable=not progress)
    todo = []
    for k, (start, stop) in enumerate(shards):
        if all(trusted(out / site / f"shard-{k:05d}.npy") for site in sites):  # finished (and intact) before
            bar.update(stop - start)
        else:
            todo.append(k)
    if capture is not None and lm.in_process:  # the capture's missing examples need the weights here
        lengths = (np.array([len(p) for p in table.prompt_ids]), np.array([len(a) for a in table.answer_ids]))
        finished = ((k, _shard_from_capture(lm, capture, sequences, index, ids, lengths, positions, sites, a, b,
                                            batch_size, bar)) for k, (a, b) in ((k, shards[k]) for k in todo))
    else:  # (k, shard) in the order the backend finishes them: here, or on Ray workers
        jobs = {k: (sequences[a:b], index[a:b], ids[a:b]) for k, (a, b) in ((k, shards[k]) for k in todo)}
        finished = lm.feature_shards(jobs, positions, sites, batch_size, bar)
    for k, store in finished:
        for site in sites:
            write_npy(out / site / f"shard-{k:05d}.npy", store[site])
    bar.close()
    write_json(Path(run_dir) / ACTIVATIONS_INDEX, meta)  # last: the store is whole


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
        again = extract_shard(lm, [sequences[i] for i in rows], index[rows], [ids[i] for i in rows], positions,
                              sites, batch_size, bar)
        for site in sites:
            store[site][:, :, missing, :] = again[site]
    capture.read_again += len(missing)
    return store


def extract_shard(lm: LoadedModel, sequences: list[list[int]], index: np.ndarray, ids: list[str],
                  positions: list[str], sites: list[str], batch_size: int = 16, bar=None) -> dict[str, np.ndarray]:
    """The features of one shard: site -> float16 ``[R, P, n, d]`` for the n ``sequences`` (token ids),
    at the positions ``index`` (int ``[n, P]``, -1 where a position does not exist; those cells hold 0).
    ``ids`` name the examples in errors. Batches run shortest first."""
    valid = index >= 0
    store = {site: np.zeros((len(site_rows(lm, site)), len(positions), len(sequences), lm.hidden_size), np.float16)
             for site in sites}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        features = extract_batch(lm, [sequences[i] for i in batch], index[batch], sites)
        for site, values in features.items():
            values = values.numpy()  # [R, B, P, d]
            with np.errstate(over="ignore", invalid="ignore"):  # found and named just below
                half = values.astype(np.float16)
            # only cells of existing positions count (the others read token 0 and are zeroed below)
            finite = np.isfinite(half).all(axis=-1) | ~valid[batch][None]
            if not finite.all():
                row, j, p = np.argwhere(~finite)[0]
                where = (f"extract: example '{ids[batch[j]]}', site {site}, layer row {row}, "
                         f"position {positions[p]}")
                if np.isfinite(values[row, j, p]).all():
                    raise TruthmapError(f"{where}: a value beyond float16's range (±65504), which the store "
                                        f"uses; probe another --site, or layers of this model cannot be stored")
                dtype = str(lm.model.dtype).replace("torch.", "")
                advice = "use --dtype float32" if dtype != "float32" else "the model overflows even in float32"
                raise TruthmapError(f"{where}: the model produced NaN/inf in {dtype}; {advice}")
            store[site][:, :, batch, :] = half.transpose(0, 2, 1, 3)
        if bar is not None:
            bar.update(len(batch))
    for site in sites:
        store[site][:, ~valid.T] = 0  # cells with no such position hold zeros
    return store


def load_layer(run_dir: str | Path, site: str, layer: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """All positions of one layer: (ids, positions, features float16 ``[P, N, d]``, valid bool ``[N, P]``).

    Every file read is checked against the run's manifest, under the folder's shared lock
    (:func:`truthmap.runfolder.reading`), unless this process already holds the folder."""
    run_dir = Path(run_dir)
    with reading(run_dir):
        meta = read_activations_index(run_dir)
        if site not in meta["sites"]:
            raise TruthmapError(f"site '{site}': not extracted in {run_dir} (have {sorted(meta['sites'])})")
        layers = meta["sites"][site]["layers"]
        if layer not in layers:
            raise TruthmapError(f"layer {layer}: site '{site}' has layers {layers[0]}..{layers[-1]}")
        row = layers.index(layer)
        parts = []
        for shard in meta["sites"][site]["shards"]:
            path = child(run_dir / ACTIVATIONS, shard["file"], "shard")
            parts.append(read_npy(path, mmap_mode="r")[row])
        valid = read_npy(run_dir / ACTIVATIONS_VALID)
        try:
            features = np.concatenate(parts, axis=1)
        except ValueError as err:
            raise TruthmapError(f"{run_dir / ACTIVATIONS}: shards of different shapes ({err}); rerun 'truthmap extract'") from None
        if valid.ndim != 2 or features.ndim != 3 or valid.shape != (len(meta["ids"]), len(meta["positions"])) \
                or features.shape[:2] != (len(meta["positions"]), len(meta["ids"])):
            raise TruthmapError(f"{run_dir / ACTIVATIONS}: the arrays do not match index.json; rerun 'truthmap extract'")
    return meta["ids"], meta["positions"], features, valid


def load_features(run_dir: str | Path, site: str, layer: int, position: str) -> tuple[list[str], np.ndarray]:
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
    c, run_dir = s.config, s.run_dir
    # shards of an interrupted extraction with the same inputs are kept; others are stale
    marker = run_dir / rf.ACTIVATIONS_FINGERPRINT
    store = run_dir / rf.ACTIVATIONS
    if s.force or (store.exists() and (not rf.trusted(marker) or marker.read_text() != s.stamp)):
        rf.remove(store)
    if not rf.trusted(marker):
        rf.write_text(marker, s.stamp)
    answers = rf.read_parquet(run_dir / rf.ANSWERS)
    generations = rf.read_parquet(run_dir / rf.GENERATIONS)
    capture = CaptureReader(run_dir, generations) if c.extract == "onepass" else None
    run_extract(s.models.lm, answers, generations, c.positions, c.sites, run_dir,
                batch_size=c.batch_size or 16, progress=c.progress, capture=capture)
    if capture is not None:
        rf.update_summary(run_dir, extract={"mode": c.extract, "captured": len(capture.where),
                                            "read_again": capture.read_again})


register(Stage(
    "extract", "3", "Hidden states at the positions, every layer (activations/).", _extract,
    inputs=(rf.ANSWERS, rf.GENERATIONS), outputs=(rf.ACTIVATIONS_INDEX,),
    settings=fields("sites", "dtype", "extract"), model="workers"))
