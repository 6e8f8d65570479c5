"""Settings of a study: one dataclass, read from the CLI, a YAML file or the Python API."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TruthmapError
from .stages.label import DEFAULT_POSITIONS, MIN_PER_CLASS, POPULATIONS, check_positions
from .models import DEFAULT_MODEL, SITES
from .tasks import check_protocol

LONG_PROMPTS = ("truncate", "skip")  # --long-prompts: what generate does with a prompt longer than the model's context
ALSO = ("attention", "samples")  # optional passes of `truthmap run`
P_TRUE_CHOICES = ("exact", "both", "none")  # the p(True) baselines asked (their columns: stages/baselines.py)
EXTRACT_MODES = ("onepass", "separate")  # read states while generating (stages/capture.py), or in a pass of their own


@dataclass
class Config:
    model: str = DEFAULT_MODEL  # hub id, local folder, .gguf file, or the embedded default
    dataset: str = "facts"  # a task (`truthmap tasks`), TASK:SPLIT, TASK:PATH, a CSV/JSONL/Parquet path, or a hub id
    data_dir: str | None = None  # folder of task files by their reference names; None: $TRUTHMAP_DATA_DIR or ./data
    on_bad_row: str = "error"  # a source row that cannot become a question: error, or skip (counted in summary.json)
    limit: int | None = None  # study a deterministic sample of this many questions
    out: str | None = None  # run folder; default runs/<model>-<dataset>
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one train/test split and probe per seed
    sites: list[str] = field(default_factory=lambda: ["residual"])  # residual, mlp, attention
    positions: list[str] = field(default_factory=lambda: list(DEFAULT_POSITIONS))
    protocol: str = "brief"  # brief ("… Answer briefly.", 24 new tokens) or reference (the reference study's settings)
    prompt_template: str | None = None  # user message for chat models ({question}, {context}); None: the task's
    max_new_tokens: int | None = None  # None: the task's under the protocol (brief 24, math 64; reference 100, math 200)
    long_prompts: str = "truncate"  # a prompt longer than the context: truncate (cut its middle) or skip
    batch_size: int | None = None  # None: chosen from the device and free memory
    dtype: str = "auto"  # auto, float32, bfloat16, float16
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    device_map: str | None = None  # e.g. "auto" to spread a large model over GPUs (accelerate)
    trust_remote_code: bool = False
    extractor_model: str | None = None  # None: the studied model; "none": no extractor
    question_column: str = "question"
    answer_column: str | None = None  # default: answers, answer or gold
    test_fraction: float = 0.3  # share of each seed's split scored for the heatmap
    validation_fraction: float = 0.2  # share that chooses the best cell and region (train: the rest, 0.5)
    population: str = "common"  # common: every column on the same answers (all positions exist); each: per column
    C: float = 1.0  # inverse L2 strength of each probe, as in scikit-learn
    bootstrap: int = 1000  # resamples for the AUC interval
    min_per_class: int = MIN_PER_CLASS  # fewest right (and wrong) answers a train or test split may hold
    progress: bool = True
    also: list[str] = field(default_factory=list)  # extra views of `run`: "attention" (attention heatmap), "samples"
    # "samples" (and any study without gold answers): N sampled answers per question, semantic entropy, entropy probes
    samples: int = 5  # sampled answers per question
    sample_temperature: float = 1.0
    judge_equivalence: bool = False  # also cluster samples by a model judging equivalence (--extractor-model or the studied one)
    extract: str = "onepass"  # onepass: states and token scores read while generating; separate: passes of their own
    p_true: str = "exact"  # p(True) baselines: exact (of the exact answer), both (and of the whole answer), none
    # Ray (truthmap/distributed.py, docs/scaling.md): generation and extraction on workers of a Ray cluster
    ray: str | None = None  # None: one process; "local": a new one-machine cluster; "auto" or "ray://HOST:10001"
    ray_workers: int | None = None  # at most this many workers (each loads the model); None: as many as fit
    ray_gpus_per_worker: int | None = None  # GPUs per worker (k > 1: the model spread over k GPUs); None: 1 if any
    ray_cpus_per_worker: int = 1  # CPUs (and torch threads, on a CPU worker) per worker

    def validate(self) -> "Config":
        for site in self.sites:
            if site not in SITES:
                raise TruthmapError(f"site '{site}': use one of {', '.join(SITES)}")
        check_positions(self.positions)
        for extra in self.also:
            if extra not in ALSO:
                raise TruthmapError(f"--also '{extra}': use one of {', '.join(ALSO)}")
        if self.samples < 2:
            raise TruthmapError(f"samples {self.samples}: draw at least 2 answers per question (an entropy needs a choice)")
        if not self.sample_temperature > 0:
            raise TruthmapError(f"sample_temperature {self.sample_temperature}: must be above 0")
        if not self.seeds:
            raise TruthmapError("seeds: give at least one seed")
        if not 0.05 <= self.test_fraction <= 0.95:
            raise TruthmapError(f"test_fraction {self.test_fraction}: use a value between 0.05 and 0.95")
        if not 0.05 <= self.validation_fraction <= 0.9 - self.test_fraction:
            raise TruthmapError(f"validation_fraction {self.validation_fraction}: use a value between 0.05 and "
                                f"{0.9 - self.test_fraction:.2f} (train keeps at least 0.1)")
        if self.population not in POPULATIONS:
            raise TruthmapError(f"population '{self.population}': use one of {', '.join(POPULATIONS)}")
        if self.extract not in EXTRACT_MODES:
            raise TruthmapError(f"extract '{self.extract}': use one of {', '.join(EXTRACT_MODES)}")
        if self.p_true not in P_TRUE_CHOICES:
            raise TruthmapError(f"p_true '{self.p_true}': use one of {', '.join(P_TRUE_CHOICES)}")
        if self.on_bad_row not in ("error", "skip"):
            raise TruthmapError(f"on_bad_row '{self.on_bad_row}': use error or skip")
        if self.min_per_class < 2:
            raise TruthmapError(f"min_per_class {self.min_per_class}: must be at least 2 (an AUC needs both classes)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise TruthmapError(f"max_new_tokens {self.max_new_tokens}: must be at least 1")
        check_protocol(self.protocol)
        if self.long_prompts not in LONG_PROMPTS:
            raise TruthmapError(f"long_prompts '{self.long_prompts}': use one of {', '.join(LONG_PROMPTS)}")
        if self.ray is not None and (not isinstance(self.ray, str) or not self.ray.strip()):
            raise TruthmapError(f"ray {self.ray!r}: use local, auto, or the address of a cluster (ray://HOST:10001)")
        for name, least in (("ray_workers", 1), ("ray_gpus_per_worker", 0), ("ray_cpus_per_worker", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise TruthmapError(f"{name} {value!r}: use a whole number, at least {least}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise TruthmapError(f"prompt_template '{self.prompt_template}': must contain {{question}}")
        return self

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        model = Path(self.model.split("::")[-1]).stem if self.model else "model"
        name = f"{model.replace('embedded:', '')}-{Path(self.dataset).stem}"
        return Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None, **overrides) -> Config:
    """A Config from a YAML file (keys = field names), with non-None ``overrides`` applied on top."""
    values = {}
    if path is not None:
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise TruthmapError(f"{path}: could not read the config ({str(err).splitlines()[0]})") from None
        except UnicodeDecodeError as err:
            raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
        except RecursionError:
            raise TruthmapError(f"{path}: nested too deeply to be a config") from None
        if not isinstance(values, dict):
            raise TruthmapError(f"{path}: a config file is a mapping of setting: value")
        known = {f.name for f in dataclasses.fields(Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TruthmapError(f"{path}: unknown setting(s) {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config(**values).validate()
    except TypeError as err:
        raise TruthmapError(f"config: {err}") from None
