"""One pass: the hidden states and token scores of each answer, read while the model writes it.

Generation (generate.py) already runs the model over every prompt and every answer token; this module
rides along with forward hooks, so the extract stage and the token-statistics baseline need no forward
pass of their own:

* the prompt's last position is read from the prefill, each answer token's states from the decoding
  step that consumes it. Generation runs one step past each answer's end (its stop token, or its
  ``max_new_tokens``-th token, is consumed too) and the extra token is cut, so the answers are the same;
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

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..positions import site_rows

CAPTURE_BYTES = 256 << 20  # the most bytes of hidden states one batch holds on the device
TAIL = 8  # the last answer tokens always held when the bound cuts an answer (the positions -8..-1)
LEAST_HEAD = 2  # and at least its first two (first_answer, second_answer)


@dataclass(frozen=True)
class CapturePlan:
    """Which states a run holds per answer: slot 0 = the prompt's last token, slots 1..head = answer
    tokens 0..head-1, the next ``tail`` slots = a ring of the answer's last ``tail`` tokens."""

    sites: tuple[str, ...]
    head: int
    tail: int

    @property
    def slots(self) -> int:
        return 1 + self.head + self.tail

    def slot(self, token: int, n_answer: int) -> int | None:
        """The slot that holds answer token ``token`` of an answer of ``n_answer`` tokens (None: not held)."""
        if token < self.head:
            return 1 + token
        if self.tail and token >= n_answer - self.tail:
            return 1 + self.head + (token - self.head) % self.tail
        return None

    def write_slot(self, token: int) -> int | None:
        """The slot answer token ``token`` is written to as it is read (the ring overwrites older tokens)."""
        if token < self.head:
            return 1 + token
        return 1 + self.head + (token - self.head) % self.tail if self.tail else None

    def to_dict(self) -> dict:
        return {**asdict(self), "sites": list(self.sites)}


def bytes_per_slot(lm, sites, batch_size: int) -> int:
    """Bytes one slot of a batch holds on the device: every layer row of every site, in the model's dtype."""
    rows = sum(len(site_rows(lm, site)) for site in sites)
    return batch_size * rows * lm.hidden_size * lm.model.dtype.itemsize


def capture_plan(lm, sites, batch_size: int, max_new_tokens: int, budget: int = CAPTURE_BYTES) -> CapturePlan | None:
    """The largest plan whose batch buffer fits in ``budget`` bytes; None when not even the prompt's last
    token, the first ``LEAST_HEAD`` and the last ``TAIL`` answer tokens fit (the run extracts separately)."""
    fit = budget // max(1, bytes_per_slot(lm, sites, batch_size))
    if fit >= 1 + max_new_tokens:
        return CapturePlan(tuple(sites), max_new_tokens, 0)
    if fit < 1 + LEAST_HEAD + TAIL:
        return None
    return CapturePlan(tuple(sites), fit - 1 - TAIL, TAIL)


class _StopAfterConsumed(StoppingCriteria):
    """Stopping rule of a capturing generation: a row ends one step after its stop token (or its
    ``max_new_tokens``-th token), so that the step consuming that token runs and is read."""

    def __init__(self, prompt_width: int, max_new_tokens: int, stop_ids: list[int]):
        self.width, self.max_new_tokens = prompt_width, max_new_tokens
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        answer = input_ids[:, self.width :]
        n = answer.shape[1]
        consumed = answer[:, : n - 1]  # every token but the newest has been fed to the model
        stopped = torch.isin(consumed, self.stop_ids.to(answer.device)).any(dim=1)
        return stopped | (n > self.max_new_tokens)


class BatchCapture:
    """Forward hooks that read one generating batch (see the module docstring).

    Step 0 is the prefill; step k ≥ 1 consumes answer token k - 1. A row's states are written only while
    it has not yet consumed its stop token, so steps run after its end change nothing.
    """

    def __init__(self, lm, plan: CapturePlan, batch: int, max_new_tokens: int, stop_ids: list[int]):
        self.lm, self.plan, self.max_new_tokens = lm, plan, max_new_tokens
        device, dtype = lm.device, lm.model.dtype
        self.rows = {site: len(site_rows(lm, site)) for site in plan.sites}
        self.states = {site: torch.zeros((batch, plan.slots, r, lm.hidden_size), dtype=dtype, device=device)
                       for site, r in self.rows.items()}
        self.prob = torch.full((batch, max_new_tokens + 1), float("nan"), device=device)
        self.entropy = torch.full((batch, max_new_tokens + 1), float("nan"), device=device)
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.ended = torch.zeros(batch, dtype=torch.bool, device=device)
        self.captured = torch.zeros(batch, dtype=torch.long, device=device)
        self.step, self.slot, self.write, self.logp = -1, 0, None, None
        self.handles = []

    # ------------------------------------------------------------ hooks
    def __enter__(self):
        self.handles.append(self.lm.embeddings.register_forward_pre_hook(self._begin_step, with_kwargs=True))
        for site in self.plan.sites:
            self.handles += self.lm.hook_site(site, self._reader(site))
        self.handles.append(self.lm.model.get_output_embeddings().register_forward_hook(self._read_logits))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _begin_step(self, _module, args, kwargs):
        """Before each forward: which slot its last position fills, and for which rows."""
        self.step += 1
        if self.step == 0:  # the prefill: every row's last prompt token (prompts are left-padded)
            self.slot, self.write = 0, None
            return
        token = self.step - 1
        consumed = (args[0] if args else next(iter(kwargs.values())))[:, -1].to(self.ended.device)
        if self.logp is not None:  # the probability the previous step gave the token it now consumes
            chosen = self.logp.gather(1, consumed[:, None].to(self.logp.device))[:, 0]
            self.prob[:, token] = chosen.exp().to(self.prob.device)
        if token >= self.max_new_tokens:  # a step past every answer: nothing to read
            self.slot, self.write = None, None
            return
        self.write = ~self.ended  # rows still in their answer (their stop token included)
        self.captured += self.write.long()
        self.ended = self.ended | torch.isin(consumed, self.stop_ids)
        self.slot = self.plan.write_slot(token)

    def _reader(self, site):
        def read(row, hidden):
            if self.slot is None:
                return
            target = self.states[site][:, self.slot, row]
            # [B, d]; a model spread over several devices (--device-map) hands it over from its own
            hidden = hidden[:, -1].to(target.device, target.dtype)
            target.copy_(hidden if self.write is None else torch.where(self.write[:, None], hidden, target))

        return read

    def _read_logits(self, _module, _inputs, output):
        if self.step > self.max_new_tokens:
            return
        logp = torch.log_softmax(self.lm.head_logits(output[:, -1]).float(), dim=-1)
        self.entropy[:, self.step] = (-(logp.exp() * logp).sum(-1)).to(self.entropy.device)
        self.logp = logp

    # ------------------------------------------------------------ generate() arguments and results
    def generate_kwargs(self, prompt_width: int, stop_ids: list[int]) -> dict:
        """Arguments of ``model.generate`` that make it run one step past each answer's end."""
        return {"max_new_tokens": self.max_new_tokens + 1, "eos_token_id": None,
                "stopping_criteria": StoppingCriteriaList([_StopAfterConsumed(prompt_width, self.max_new_tokens,
                                                                              stop_ids)])}

    def results(self, answer_lengths: list[int]) -> dict:
        """The batch's capture on the CPU: float16 states per site ``[B, slots, rows, d]``, ``captured``
        (answer tokens read per row) and the token probability / entropy of each answer token."""
        captured = np.minimum(self.captured.cpu().numpy(), answer_lengths)
        prob, entropy = self.prob.cpu().numpy(), self.entropy.cpu().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float16: found when extracted, read again
            states = {site: x.float().cpu().numpy().astype(np.float16) for site, x in self.states.items()}
        return {
            "states": states,
            "captured": captured.tolist(),
            "token_prob": [prob[i, :n].astype(np.float32) for i, n in enumerate(answer_lengths)],
            "token_entropy": [entropy[i, :n].astype(np.float32) for i, n in enumerate(answer_lengths)],
        }


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

    def batch(self, size: int, max_new_tokens: int, stop_ids: list[int]) -> BatchCapture | None:
        """Hooks for one batch, or None when this run does not capture."""
        return BatchCapture(self.lm, self.plan, size, max_new_tokens, stop_ids) if self.plan else None

    def add(self, batch_results: dict) -> None:
        self.pending.append(batch_results)

    def finish_chunk(self, k: int, frame: pd.DataFrame) -> pd.DataFrame:
        """Write chunk ``k``'s states; ``frame`` (its rows in order) with its capture columns added."""
        from ..runfolder import write_npy

        parts, self.pending = self.pending, []
        if self.plan is None or sum(len(p["captured"]) for p in parts) != len(frame):
            return frame  # an answer was not captured (no plan, or a batch retried): extract reads it
        for site in self.plan.sites:
            write_npy(capture_path(self.chunks.folder, k, site), np.concatenate([p["states"][site] for p in parts]))
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

    def __init__(self, run_dir: Path, generations: pd.DataFrame):
        from ..runfolder import CHUNK_PLAN, GENERATION_CHUNKS, read_json, read_parquet, trusted

        self.folder = Path(run_dir) / GENERATION_CHUNKS
        plan_path = self.folder / CHUNK_PLAN
        saved = (read_json(plan_path) if trusted(plan_path) else {}).get("capture")
        self.plan = CapturePlan(tuple(saved["sites"]), saved["head"], saved["tail"]) if saved else None
        self.where: dict[str, tuple[int, int, int]] = {}  # id -> (chunk, row in chunk, answer tokens read)
        self.read_again = 0  # examples the extract stage had to read with a forward pass
        ids, answers = generations["id"].tolist(), generations["answer_ids"].tolist()
        self.untrusted = 0  # chunks whose capture files the manifest does not vouch for: read again
        k = 0
        while self.plan is not None and trusted(self.folder / f"chunk-{k:05d}.parquet"):
            chunk = read_parquet(self.folder / f"chunk-{k:05d}.parquet")
            if "captured" in chunk.columns and not all(trusted(capture_path(self.folder, k, site))
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
        from ..runfolder import read_npy

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
                states = read_npy(capture_path(self.folder, k, site), mmap_mode="r")  # checked: listed, intact
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
