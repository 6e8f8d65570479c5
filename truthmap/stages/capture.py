"""One pass: the hidden states and token scores of each answer, read while the model writes it.

Generation (generate.py) already runs the model over every prompt and every answer token; the backend
reads the states and token scores as it goes (generate with capture: ``answer_chunks`` in
truthmap/backends/base.py; the hooks are truthmap/backends/hf.py's ``BatchCapture``), so the extract
stage and the token-statistics baseline need no forward pass of their own. This module plans and keeps
that capture:

* the prompt's last position is read from the prefill, each answer token's states from the decoding
  step that consumes it; generation runs one step past each answer's end and the extra token is cut,
  so the answers are the same;
* the probability of each answer token and the entropy of the distribution it was drawn from come
  from the logits that generation computes anyway (two scalars per token, never logits);
* a batch's states are held on the model's device in a buffer of at most ``CAPTURE_BYTES`` (the bound
  fixes how many answer tokens are held: the first ``head`` and the last ``tail``, see
  :func:`capture_plan`), then written, float16, beside the generation chunk they belong to:
  ``generations/capture-<chunk>-<site>.npy``, ``[rows, slots, layer rows, d]``. The chunk's parquet
  gains ``captured`` (answer tokens whose states were read), ``token_prob`` and ``token_entropy``.

The positions a study keeps are known only once its answers are labelled, so the extract stage picks
them out of these files (:class:`CaptureReader`) and reads the rest, if any (positions beyond the bound,
a site or chunk that was not captured), with the separate forward pass of extract.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..backends.base import CapturePlan, ModelBackend
from ..positions import site_rows

CAPTURE_BYTES = 256 << 20  # the most bytes of hidden states one batch holds on the device
TAIL = 8  # the last answer tokens always held when the bound cuts an answer (the positions -8..-1)
LEAST_HEAD = 2  # and at least its first two (first_answer, second_answer)


def bytes_per_slot(lm: ModelBackend, sites, batch_size: int) -> int:
    """Bytes one slot of a batch holds on the device: every layer row of every site, in the model's dtype."""
    rows = sum(len(site_rows(lm, site)) for site in sites)
    return batch_size * rows * lm.hidden_size * lm.bytes_per_value()


def capture_plan(lm: ModelBackend, sites, batch_size: int, max_new_tokens: int,
                 budget: int = CAPTURE_BYTES) -> CapturePlan | None:
    """The largest plan whose batch buffer fits in ``budget`` bytes; None when not even the prompt's last
    token, the first ``LEAST_HEAD`` and the last ``TAIL`` answer tokens fit (the run extracts separately)."""
    fit = budget // max(1, bytes_per_slot(lm, sites, batch_size))
    if fit >= 1 + max_new_tokens:
        return CapturePlan(tuple(sites), max_new_tokens, 0)
    if fit < 1 + LEAST_HEAD + TAIL:
        return None
    return CapturePlan(tuple(sites), fit - 1 - TAIL, TAIL)


def capture_path(folder: Path, k: int, site: str) -> Path:
    return Path(folder) / f"capture-{k:05d}-{site}.npy"


class ChunkCapture:
    """The capture of a resumable generation (a :class:`truthmap.runfolder.ChunkStore`): the plan is
    fixed by the run that began it (``plan.json``), and each chunk's states are written just before
    the chunk itself, so a finished chunk has its capture unless that write was lost."""

    def __init__(self, lm, chunks, sites: list[str], budget: int | None = None):
        self.lm, self.chunks, self.sites, self.budget = lm, chunks, list(sites), budget
        self.plan: CapturePlan | None = None
        self.pending: list[dict] = []  # the finished batches of the chunk being generated
        self.stats: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (token_prob, token_entropy)

    def start(self, batch_size: int, max_new_tokens: int) -> None:
        proposed = capture_plan(self.lm, self.sites, batch_size, max_new_tokens, self.budget or CAPTURE_BYTES)
        saved = self.chunks.setting("capture", proposed.to_dict() if proposed else None)
        self.plan = CapturePlan(tuple(saved["sites"]), saved["head"], saved["tail"]) if saved else None

    def add(self, batch_results: dict) -> None:
        """One generated batch's capture, as the backend hands it over (base.py, ``answer_chunks``)."""
        self.pending.append(batch_results)

    def finish_chunk(self, k: int, frame: pd.DataFrame) -> pd.DataFrame:
        """Write chunk ``k``'s states; ``frame`` (its rows in order) with its capture columns added."""
        from ..runfolder import at

        parts, self.pending = self.pending, []
        if self.plan is None or sum(len(p["captured"]) for p in parts) != len(frame):
            return frame  # an answer was not captured (no plan, or a batch retried): extract reads it
        folder = at(self.chunks.run or self.chunks.folder.parent)  # the run holding the chunks
        for site in self.plan.sites:
            folder.write_npy(capture_path(self.chunks.folder, k, site), np.concatenate([p["states"][site] for p in parts]))
        frame = frame.assign(captured=[c for p in parts for c in p["captured"]],
                             token_prob=[x for p in parts for x in p["token_prob"]],
                             token_entropy=[x for p in parts for x in p["token_entropy"]])
        self.read_chunk(frame)
        return frame

    def read_chunk(self, frame: pd.DataFrame) -> None:
        """Keep the token scores of a chunk (finished now or by an earlier run)."""
        if "token_prob" in frame.columns:
            for row, prob, entropy in zip(frame["row"], frame["token_prob"], frame["token_entropy"]):
                self.stats[int(row)] = (np.asarray(prob, np.float32), np.asarray(entropy, np.float32))

    def columns(self, n: int) -> dict:
        """``token_prob`` and ``token_entropy`` of rows 0..n-1 (None where a row was not captured)."""
        found = [self.stats.get(i) for i in range(n)]
        return {"token_prob": [f[0] if f else None for f in found],
                "token_entropy": [f[1] if f else None for f in found]}


class CaptureReader:
    """The captured states of a finished generation, looked up by answer id (extract stage)."""

    def __init__(self, run_dir, generations: pd.DataFrame):
        """``run_dir``: a run folder or an open Run (:func:`truthmap.runfolder.at`)."""
        from ..runfolder import CHUNK_PLAN, GENERATION_CHUNKS, at

        self.run = run = at(run_dir)
        self.folder = run.path(GENERATION_CHUNKS)
        plan = f"{GENERATION_CHUNKS}/{CHUNK_PLAN}"
        saved = (run.read_json(plan) if run.trusted(plan) else {}).get("capture")
        self.plan = CapturePlan(tuple(saved["sites"]), saved["head"], saved["tail"]) if saved else None
        self.where: dict[str, tuple[int, int, int]] = {}  # id -> (chunk, row in chunk, answer tokens read)
        self.read_again = 0  # examples the extract stage had to read with a forward pass
        ids, answers = generations["id"].tolist(), generations["answer_ids"].tolist()
        self.untrusted = 0  # chunks whose capture files the manifest does not vouch for: read again
        k = 0
        while self.plan is not None and run.trusted(self.folder / f"chunk-{k:05d}.parquet"):
            chunk = run.read_parquet(self.folder / f"chunk-{k:05d}.parquet")
            if "captured" in chunk.columns and not all(run.trusted(capture_path(self.folder, k, site))
                                                       for site in self.plan.sites):
                self.untrusted += 1  # missing, damaged (deleted when the run opened) or not listed: never read
            elif "captured" in chunk.columns:
                for j, (row, captured, answer) in enumerate(zip(chunk["row"], chunk["captured"], chunk["answer_ids"])):
                    # the chunk belongs to this generation only if it holds the same answer
                    if int(row) < len(ids) and list(answers[int(row)]) == list(answer):
                        self.where[ids[int(row)]] = (k, j, int(captured))
            k += 1

    def slots(self, answer_id: str, n_prompt: int, n_answer: int, index: np.ndarray) -> tuple[int, int, np.ndarray] | None:
        """(chunk, row, slot of each position) where every existing position of ``index`` was captured."""
        found = self.where.get(answer_id)
        if found is None:
            return None
        k, j, captured = found
        slots = np.zeros(len(index), dtype=np.int64)
        for p, i in enumerate(index):
            if i < 0:
                continue
            token = int(i) - n_prompt
            slot = 0 if token == -1 else (self.plan.slot(token, n_answer) if 0 <= token < captured else None)
            if slot is None:
                return None
            slots[p] = slot
        return k, j, slots

    def fill(self, store: dict, sites: list[str], ids: list[str], n_prompt, n_answer, index: np.ndarray) -> list[int]:
        """Copy the captured cells into ``store`` (site -> float16 ``[R, P, n, d]``, as extract writes it);
        return the rows it could not fill (not captured, a capture file the manifest does not vouch for or
        of another shape, or a value beyond float16), for a separate pass."""
        if self.plan is None or not set(sites) <= set(self.plan.sites):
            return list(range(len(ids)))
        missing, by_chunk = [], {}
        for n, answer_id in enumerate(ids):
            found = self.slots(answer_id, int(n_prompt[n]), int(n_answer[n]), index[n])
            if found is None:
                missing.append(n)
            else:
                by_chunk.setdefault(found[0], []).append((n, found[1], found[2]))
        valid = index >= 0
        for k, rows in sorted(by_chunk.items()):  # one chunk file open at a time: memory stays one shard
            for site in sites:
                states = self.run.read_npy(capture_path(self.folder, k, site), mmap_mode="r")  # checked: listed, intact
                layers, _, _, d = store[site].shape
                if states.ndim != 4 or states.shape[1] != self.plan.slots or states.shape[2:] != (layers, d):
                    missing.extend(n for n, _, _ in rows)  # not the shape this run writes: read them again
                    continue
                for n, j, slots in rows:
                    if j >= states.shape[0]:
                        missing.append(n)
                        continue
                    cells = np.asarray(states[j, slots])  # [P, R, d]
                    cells[~valid[n]] = 0
                    if not np.isfinite(cells).all():
                        missing.append(n)
                        continue
                    store[site][:, :, n, :] = cells.transpose(1, 0, 2)
                del states
        return sorted(set(missing))
