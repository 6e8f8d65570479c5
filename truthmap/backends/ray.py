"""The Ray backend: the model stages on Ray workers, the same study spread over many processes, GPUs and
machines.

With ``ray`` set (``truthmap run --ray [ADDRESS]``, or ``ray: ADDRESS`` in the YAML config) the driver —
the process that runs the pipeline — starts one Ray actor per GPU (``ray_gpus_per_worker`` GPUs each,
for a model larger than one GPU) or per ``ray_cpus_per_worker`` CPUs. Each actor loads the model once
and then answers chunks of questions (generate, and the label stage's extractor), computes shards of
features (extract) and scores chunks of prompts by their next token (the label stage's judge), one at a
time, with the very functions the single-process path uses (:func:`truthmap.backends.hf.answer_prompts`,
:func:`truthmap.backends.hf.extract_shard`, :func:`truthmap.backends.hf.next_token_logprobs`).

The driver keeps everything else: it tokenizes the prompts, plans the chunks and shards exactly as a
single-process run does (so the batches, the greedy answers and the features are the same), receives
each finished chunk or shard through Ray's object store and writes it into the run folder at once
(``generations/chunk-NNNNN.parquet``, ``activations/<site>/shard-NNNNN.npy``, listed in the manifest),
and merges them in their fixed order. So no shared file system is needed, a chunk is never counted
twice, and a driver that dies resumes, when rerun, from the chunks and shards it had written.

A worker process that dies (killed, preempted node) is restarted by Ray, which reloads the model and
retries the chunk it held (``max_restarts`` / ``max_task_retries``, ``MAX_RESTARTS`` times); only that
chunk's work is lost. On the driver, the model is a :class:`RemoteModel`: its tokenizer and config,
no weights — an implementation of the backend contract (base.py) whose methods that need the weights
here (sampling, capture, token statistics, attention) say so in one line: the factory
(factory.py) gives those uses the model in this process.

``TRUTHMAP_RAY_FAILPOINT=<generate|extract|score>:<k>:<marker file>`` makes the worker that starts chunk
(or shard) ``k`` of that work SIGKILL itself, once: it creates the marker file first, and a marker
that exists disarms it. The kill test uses it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import TruthmapError
from .base import ConfigFacts
from .hf import LoadedModel, answer_prompts, extract_shard, load_model, next_token_logprobs

SCORE_CHUNK_BATCHES = 4  # batches of next-token scores per chunk a worker takes at a time
MAX_RESTARTS = 3  # how often a lost worker is restarted, and its chunk retried, before the run stops
# environment variables a worker gets from the driver (a remote cluster does not inherit the driver's)
_PASSED_ENV = ("TRUTHMAP_RAY_FAILPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def import_ray():
    """The ``ray`` module, or a TruthmapError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise TruthmapError("--ray: Ray is not installed; install it with: pip install 'truthmap[ray]' "
                            "(or pip install ray), or run without --ray") from None
    return ray


class _ConfigOnly:
    """What the driver knows of the model: its config and generation config (for the context length and
    the end-of-turn tokens), no weights."""

    def __init__(self, config, generation_config, dtype):
        self.config, self.generation_config, self.dtype = config, generation_config, dtype


def _here(what: str) -> TruthmapError:
    return TruthmapError(f"{what} need the model in this process: run without --ray")


@dataclass
class RemoteModel(ConfigFacts):
    """A model held by Ray workers, as the driver sees it (the backend contract of base.py): the
    tokenizer, the layout (``n_layers``, ``hidden_size``), the config in ``model``; no weights. Answers,
    feature shards and next-token scores are computed by ``workers``."""

    model: _ConfigOnly
    tokenizer: object
    model_id: str
    source: str
    gguf_file: str | None
    revision: str
    n_layers: int
    hidden_size: int
    workers: Workers
    in_process: ClassVar[bool] = False

    def describe(self) -> str:
        return f"{self.model_id} ({self.revision}) on {len(self.workers.actors)} Ray worker(s)"

    def auto_batch_size(self, longest: int) -> int:
        return self.workers.auto_batch_size(longest)

    def answer_chunks(self, jobs: dict, max_new_tokens: int, batch_size: int, bar=None, sample=None,
                      capture=None):
        """Greedy answers only; ``capture`` is ignored (the extract stage reads the states)."""
        if sample is not None:
            raise TruthmapError("sampled answers are drawn in this process: run without --ray")
        return self.workers.answer_chunks(jobs, max_new_tokens, batch_size, bar)

    def feature_shards(self, jobs: dict, positions: list[str], sites: list[str], batch_size: int, bar=None):
        return self.workers.extract_shards(jobs, positions, sites, batch_size, bar)

    def hidden_states(self, sequences, index, sites) -> dict:
        raise _here("hidden states of single batches")

    def token_statistics(self, sequences, n_prompt) -> list:
        raise _here("token statistics")

    def next_token_logprobs(self, prompts, token_sets, batch_size: int = 16, shared=None):
        return self.workers.next_token_logprobs(prompts, token_sets, batch_size, shared)

    def attention_weights(self, sequences, index):
        raise _here("attention weights")

    def close(self) -> None:
        self.workers.close()


class _ModelWorker:
    """A Ray actor: loads the model once, then answers chunks and computes feature shards."""

    def __init__(self, model: str, dtype: str, device: str, device_map: str | None, trust_remote_code: bool,
                 threads: int):
        if device == "cpu":
            torch.set_num_threads(threads)
        # a model that does not load is reported by the first call, as an error of the work, so that Ray
        # does not restart the worker to load it again and again
        self.lm, self.error = None, None
        try:
            self.lm = load_model(model, dtype, device, device_map, trust_remote_code)
        except TruthmapError as err:
            self.error = err

    def _model(self) -> LoadedModel:
        if self.error is not None:
            raise self.error
        return self.lm

    def describe(self) -> dict:
        lm = self._model()
        return {"tokenizer": lm.tokenizer, "model_id": lm.model_id, "source": lm.source, "gguf_file": lm.gguf_file,
                "revision": lm.revision, "n_layers": lm.n_layers, "hidden_size": lm.hidden_size,
                "config": lm.model.config, "generation_config": lm.model.generation_config,
                "dtype": lm.model.dtype}

    def auto_batch_size(self, longest: int) -> int:
        return self._model().auto_batch_size(longest)

    def answer(self, k: int, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int):
        """Chunk ``k``: (answer ids, stopped) of each prompt."""
        _failpoint("generate", k)
        lm = self._model()
        answers, _ = answer_prompts(lm, prompt_ids, max_new_tokens, batch_size, lm.end_of_turn_ids())
        return answers

    def extract(self, k: int, sequences, index, ids, positions, sites, batch_size):
        """Shard ``k``: site -> float16 ``[R, P, n, d]``."""
        _failpoint("extract", k)
        return extract_shard(self._model(), sequences, index, ids, positions, sites, batch_size)

    def score(self, k: int, prompts, token_sets, batch_size, shared):
        """Chunk ``k`` of next-token scores: float ``[len(prompts), S]``."""
        _failpoint("score", k)
        return next_token_logprobs(self._model(), prompts, token_sets, batch_size, shared)


def _failpoint(stage: str, k: int) -> None:
    spec = os.environ.get("TRUTHMAP_RAY_FAILPOINT")
    if not spec:
        return
    want_stage, want_k, marker = spec.split(":", 2)
    if (want_stage, want_k) != (stage, str(k)):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # this worker's predecessor already died here once
    os.kill(os.getpid(), signal.SIGKILL)


class Workers:
    """The actors of one run, and the loop that keeps each busy with one chunk (or shard) at a time."""

    def __init__(self, ray, actors: list, started_ray: bool):
        self.ray, self.actors, self.started_ray = ray, actors, started_ray

    def auto_batch_size(self, longest: int) -> int:
        return self._get(self.actors[0].auto_batch_size.remote(longest), "choosing the batch size")

    def answer_chunks(self, jobs: dict, max_new_tokens: int, batch_size: int, bar=None):
        """Yield (k, answers) for each chunk ``k -> prompt ids`` of ``jobs``, in the order they finish."""
        def submit(actor, k):
            return actor.answer.remote(k, jobs[k], max_new_tokens, batch_size)

        for k, answers in self._run(sorted(jobs), submit, "generate: chunk"):
            if bar is not None:
                bar.update(len(answers))
            yield k, answers

    def extract_shards(self, jobs: dict, positions: list[str], sites: list[str], batch_size: int, bar=None):
        """Yield (k, site -> features) for each shard ``k -> (sequences, index, ids)``, as they finish."""
        def submit(actor, k):
            return actor.extract.remote(k, *jobs[k], positions, sites, batch_size)

        for k, store in self._run(sorted(jobs), submit, "extract: shard"):
            if bar is not None:
                bar.update(len(jobs[k][0]))
            yield k, store

    def next_token_logprobs(self, prompts: list[list[int]], token_sets: list[list[int]], batch_size: int,
                            shared=None) -> np.ndarray:
        """The contract's ``next_token_logprobs``, float ``[N, S]`` in the order of ``prompts``: the prompts
        are cut into chunks of ``SCORE_CHUNK_BATCHES`` whole batches, planned as the single-process
        backend plans its batches (by length; with ``shared``, whole groups in their order), so each
        worker forms the same batches and the scores equal a single-process call's on the same kind of
        device (with ``shared``, to float rounding: a chunk computes its own common beginning)."""
        step = SCORE_CHUNK_BATCHES * max(int(batch_size), 1)
        rows, jobs = {}, {}  # k -> the chunk's rows of prompts; k -> (its prompts, its groups or None)
        if shared is None:
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            for k, start in enumerate(range(0, len(order), step)):
                rows[k] = order[start : start + step]
                jobs[k] = ([prompts[i] for i in rows[k]], None)
        else:
            for k, start in enumerate(range(0, len(shared), step)):
                part = shared[start : start + step]
                rows[k] = [i for indices, _ in part for i in indices]
                local, groups = iter(range(len(rows[k]))), []
                for indices, marker in part:  # the group's prompts renumbered within the chunk
                    groups.append(([next(local) for _ in indices], marker))
                jobs[k] = ([prompts[i] for i in rows[k]], groups)
        out = np.full((len(prompts), len(token_sets)), np.nan)

        def submit(actor, k):
            chunk, groups = jobs[k]
            return actor.score.remote(k, chunk, token_sets, batch_size, groups)

        for k, scores in self._run(sorted(jobs), submit, "next-token scores: chunk"):
            out[rows[k]] = scores
        return out

    def _run(self, queue: list[int], submit, what: str):
        # what is still in flight when the driver stops early (an error, Ctrl-C) ends with the actors (close)
        running = {}  # object ref -> (k, actor)
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                actor, k = idle.pop(), queue.pop(0)
                running[submit(actor, k)] = (k, actor)
            (ref,), _ = self.ray.wait(list(running), num_returns=1)
            k, actor = running.pop(ref)
            result = self._get(ref, f"{what} {k}")
            idle.append(actor)
            yield k, result

    def _get(self, ref, what: str):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the work itself failed: the worker's own error
            if isinstance(err.cause, TruthmapError):
                raise TruthmapError(str(err.cause)) from None
            raise
        except ray.exceptions.RayActorError as err:
            raise TruthmapError(
                f"{what}: a Ray worker was lost {MAX_RESTARTS + 1} times ({_first_line(err)}); the finished chunks "
                f"and shards are saved in the run folder: rerun the same command to resume from them"
            ) from None

    def close(self) -> None:
        actors, self.actors = self.actors, []  # a second close has nothing left to stop
        for actor in actors:
            self.ray.kill(actor)
        if self.started_ray and actors:
            self.ray.shutdown()


def _first_line(err) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


def start_workers(config) -> RemoteModel:
    """Connect to (or start) the Ray cluster ``config.ray``, start the workers, and return the model as
    the driver sees it. Each worker loads the model; this waits for the first."""
    ray = import_ray()
    started_ray = False
    if not ray.is_initialized():
        # "local": a new one-machine cluster; "auto": the cluster this machine belongs to;
        # "ray://HOST:10001": a remote cluster through Ray Client
        # a new local instance is private to this run: no dashboard, worker logs stay in its log folder
        options = dict(include_dashboard=False, log_to_driver=False) if config.ray == "local" else {}
        try:
            ray.init(address=config.ray, **options)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise TruthmapError(f"--ray {config.ray}: could not connect to a Ray cluster ({_first_line(err)}); "
                                f"use --ray local for a one-machine cluster, or start one with `ray start --head`") from None
        started_ray = True
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    gpus_per_worker = config.ray_gpus_per_worker if config.ray_gpus_per_worker is not None else (1 if gpus else 0)
    cpus_per_worker = config.ray_cpus_per_worker
    if gpus_per_worker:
        fits = int(gpus // gpus_per_worker)
        unit = f"{gpus_per_worker} GPU(s) per worker; the cluster has {gpus:g} GPU(s)"
    else:
        fits = int(cpus // cpus_per_worker)
        unit = f"{cpus_per_worker} CPU(s) per worker; the cluster has {cpus:g} CPU(s)"
    n_workers = min(fits, config.ray_workers) if config.ray_workers else fits
    if n_workers < 1:
        if started_ray:
            ray.shutdown()
        raise TruthmapError(f"--ray {config.ray}: no room for a model worker ({unit}); lower "
                            f"ray_gpus_per_worker / ray_cpus_per_worker, or add machines to the cluster")
    device = "cpu" if not gpus_per_worker else ("cuda" if config.device in ("auto", "cpu") else config.device)
    # a worker with several GPUs spreads the model over them (accelerate)
    device_map = config.device_map or ("auto" if gpus_per_worker > 1 else None)
    env = {"OMP_NUM_THREADS": str(cpus_per_worker), "TOKENIZERS_PARALLELISM": "false"}
    env.update({name: os.environ[name] for name in _PASSED_ENV if name in os.environ})
    actor_class = ray.remote(_ModelWorker).options(
        num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_RESTARTS, runtime_env={"env_vars": env})
    actors = [actor_class.remote(config.model, config.dtype, device, device_map, config.trust_remote_code,
                                 cpus_per_worker) for _ in range(n_workers)]
    workers = Workers(ray, actors, started_ray)
    try:
        facts = workers._get(actors[0].describe.remote(), "loading the model")
    except BaseException as err:
        workers.close()
        if isinstance(err, TruthmapError):
            raise TruthmapError(f"--ray: a worker could not load model '{config.model}': {err}") from None
        raise
    return RemoteModel(
        model=_ConfigOnly(facts["config"], facts["generation_config"], facts["dtype"]), tokenizer=facts["tokenizer"],
        model_id=facts["model_id"], source=facts["source"], gguf_file=facts["gguf_file"], revision=facts["revision"],
        n_layers=facts["n_layers"], hidden_size=facts["hidden_size"], workers=workers)
