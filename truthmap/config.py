"""Settings of a study: one typed schema (pydantic), read from the CLI, a YAML file, a run's saved
config.json and the Python API.

Every setting is one declaration in :class:`Config`: its name (= YAML key = Python keyword; the CLI flag
is the name with ``-``), its type (which gives its choices and range), its default, its help text and the
stages that use it. The CLI's options are generated from these declarations (``truthmap/cli.py``), so
adding a setting is adding one line here::

    exact_answer: Literal["blind", "gold"] = setting("blind", "How the exact answer is found: ...", stages=("label",))

and regenerating docs/settings.md (``settings_table``; tests/unit/test_docs_match_cli.py says how).

Values are checked strictly: a string is never a boolean or a number, numbers are finite and in range,
positions are ASCII names, choices are checked. A value that fails is a one-line TruthmapError naming
the setting and where it came from (``c.yaml: trust_remote_code: 'false' is a string; use true or
false``); a Config that exists is valid, and assigning an attribute is checked the same way, so nothing
invalid is ever saved into a run's config.json.

pydantic is the schema library: it is the type-checking validator most of the Python ecosystem uses,
strict mode refuses the coercions (``"false"`` → True, ``"5"`` → 5) that caused the failures, and its
declarations carry the metadata the CLI is generated from.
"""

from __future__ import annotations

import contextvars
import difflib
import re
import string
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TruthmapError
from .constants import DEFAULT_MODEL, EXACT_ANSWER_MODES, GRADERS, MIN_PER_CLASS, POPULATIONS, SITES
from .positions import DEFAULT_POSITIONS, NAMED_POSITIONS, is_position
from .tasks import PROTOCOLS

LONG_PROMPTS = ("truncate", "skip")  # --long-prompts: what generate does with a prompt longer than the model's context
ALSO = ("attention", "samples")  # optional passes of `truthmap run`
P_TRUE_CHOICES = ("exact", "both", "none")  # the p(True) baselines asked (their columns: stages/baselines.py)
EXTRACT_MODES = ("onepass", "separate")  # read states while generating (stages/capture.py), or in a pass of their own
DTYPES = ("auto", "float32", "bfloat16", "float16")
PROMPT_FIELDS = ("question", "question_base", "context")  # what a prompt template may name (stages/generate.py)

# the stages of a study (the stage registry, stages/base.py; tests/unit/test_pipeline.py checks these are its
# own); a setting names those whose work it changes
MODEL_STAGES = ("generate", "label", "extract", "samples", "baselines", "attention")  # may load the model
RAY_STAGES = ("generate", "label", "extract")  # on Ray workers with --ray
ALL = "all"  # a setting every stage command takes (the run folder and the model it names)
RUN = ()  # a setting only `truthmap run` takes


def setting(default: Any = None, help: str = "", *, stages: tuple[str, ...] | str = RUN, flag: str | None = None,
            aliases: tuple[str, ...] = (), outside: bool = False, metavar: str | None = None,
            flag_value: str | None = None, value: str | None = None, default_factory=None) -> Any:
    """The declaration of one setting.

    ``help``: one sentence for ``--help`` and the docs; ``stages``: the stage commands whose ``--help``
    shows it (ALL: every one; RUN: only ``run``, which shows every setting); ``flag``: the CLI flag when
    it is not ``--name-with-dashes``; ``aliases``: other flags that still work (of a boolean, written as
    click does: ``" /--quiet"`` is another way to say ``--no-progress``); ``outside``: it names a
    file, folder or model outside the run folder, so it is never continued from a saved config.json;
    ``flag_value``: the value of the flag given without one (``--ray`` alone: ``local``); ``value``: how to
    write a good value, where the type alone says only "text".
    """
    extra = {"stages": stages, "flag": flag, "aliases": aliases, "outside": outside, "metavar": metavar,
             "flag_value": flag_value, "value": value}
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra)
    return Field(default=default, description=help, json_schema_extra=extra)


class SettingError(ValueError):
    """A value refused by a check of its own (raised inside the schema; names the setting)."""

    def __init__(self, name: str, text: str):
        super().__init__(text)
        self.name, self.text = name, text


def _text(value: str) -> str:
    """A text setting: one line of printable text (a path, an id, a name)."""
    if not value.strip():
        raise ValueError("is empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("holds a control character")
    if len(value) > 4096:
        raise ValueError("is longer than 4096 characters")
    return value


def _ascii_word(value: str) -> str:
    """A name of the device, dtype or cluster kind: ASCII without spaces."""
    if not re.fullmatch(r"[A-Za-z0-9_.:/\[\]@-]+", value):
        raise ValueError("is not a name of ASCII letters, digits and ._:/-")
    return value


def _template_text(value: str) -> str:
    """A prompt template: text of lines (newlines and tabs kept), no other control character."""
    if any((ord(c) < 32 and c not in "\n\t\r") or ord(c) == 127 for c in value):
        raise ValueError("holds a control character other than a line break or a tab")
    if len(value) > 100_000:
        raise ValueError("is longer than 100000 characters")
    return value


Text = Annotated[str, AfterValidator(_text)]  # paths, ids, column names
Template = Annotated[str, AfterValidator(_template_text)]
Word = Annotated[str, AfterValidator(_text), AfterValidator(_ascii_word)]
Whole = Annotated[int, Field(ge=0, le=2**31 - 1)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's seed range
Site = Literal[SITES]
Position = Annotated[str, AfterValidator(lambda p: _position(p))]


def _position(p: str) -> str:
    if is_position(p):
        return p
    raise ValueError("is not a position")


_SOURCE = contextvars.ContextVar("settings_source", default=("Config()", None))  # named in errors


class Config(BaseModel):
    """The settings of one study. ``Config(limit=40)``; every field is also a YAML key and a CLI flag."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              protected_namespaces=(), validate_default=False)

    # what is studied (these name things outside the run folder: never taken from a saved config.json)
    model: Text = setting(DEFAULT_MODEL, "Hub id, local folder, .gguf file, or the embedded default "
                          "(default embedded:smollm2-135m-instruct).", stages=ALL, outside=True, metavar="MODEL",
                          value="a hub id, a local folder or .gguf file, or embedded:NAME")
    dataset: Text = setting("facts", "A task (see `truthmap tasks`), TASK:SPLIT, TASK:PATH, a CSV/JSONL/Parquet path, "
                            "or a hub dataset id (default facts, built in).", stages=ALL, outside=True,
                            metavar="DATASET", value="a task, TASK:SPLIT, TASK:PATH, a file path or a hub id")
    data_dir: Text | None = setting(None, "Folder holding task files by their reference names (default "
                                    "$TRUTHMAP_DATA_DIR or ./data).", stages=("generate",), outside=True,
                                    metavar="DIR", value="a folder")
    on_bad_row: Literal["error", "skip"] = setting("error", "A source row that cannot become a question: stop with "
                                                   "its file and row (error, default) or skip it (counted in "
                                                   "summary.json).", stages=("generate",))
    limit: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = setting(
        None, "Study a deterministic sample of N questions.", stages=("generate",), metavar="N")
    out: Text | None = setting(None, "Run folder (default runs/<model>-<dataset>).", stages=ALL, outside=True,
                               metavar="DIR", value="a folder")
    question_column: Text = setting("question", "Column of the questions (matched ignoring case).",
                                    stages=("generate",), value="a column name (a.b: a nested field)")
    answer_column: Text | None = setting(None, "Column of the gold answers (default: answers, answer or gold, "
                                         "matched ignoring case).", stages=("generate",),
                                         value="a column name (a.b: a nested field)")
    # how the model answers
    protocol: Literal[PROTOCOLS] = setting("brief", "Generation settings: brief (default; '… Answer briefly.', 24 new "
                                           "tokens) or reference (the reference study's: the question alone, 100 new "
                                           "tokens, math 200; its grading: a gold alias is a substring of the answer; "
                                           "and its probe: LogisticRegression() defaults on raw features; "
                                           "docs/tasks.md).", stages=("generate", "label", "probe"))
    prompt_template: Template | None = setting(None, "User message for chat models, with {question} (and {context} for "
                                           "tasks with a passage); default: the task's.", stages=("generate",),
                                           value="text with {question}")
    max_new_tokens: Annotated[int, Field(ge=1, le=100_000)] | None = setting(
        None, "New tokens per answer (default: the task's under the protocol: brief 24, math 64; reference 100, "
        "math 200).", stages=("generate", "samples"))
    long_prompts: Literal[LONG_PROMPTS] = setting("truncate", "A prompt longer than the model's context: cut its middle "
                                                  "(truncate, default) or skip the question.", stages=("generate",))
    # where and how the model runs
    batch_size: Annotated[int, Field(ge=1, le=100_000)] | None = setting(
        None, "Answers per batch (default: chosen from the device and free memory).", stages=MODEL_STAGES)
    dtype: Literal[DTYPES] = setting("auto", "Weights' precision: auto, float32, bfloat16, float16.", stages=MODEL_STAGES)
    device: Word = setting("auto", "auto, cpu, cuda, cuda:N.", stages=MODEL_STAGES, value="auto, cpu, cuda or cuda:N")
    device_map: Word | None = setting(None, "e.g. auto: spread a large model over several GPUs (accelerate).",
                                      stages=MODEL_STAGES, value="an accelerate device map: auto, balanced, sequential")
    trust_remote_code: bool = setting(False, "Run the model repo's own code (default: no; never taken from a run "
                                      "folder).", stages=MODEL_STAGES)
    extractor_model: Text | None = setting(None, "Model asked for exact answers the rules miss (default: the studied "
                                           "model; none to skip).", stages=("label", "samples"), outside=True,
                                           value="a model, as --model, or none")
    extract: Literal[EXTRACT_MODES] = setting("onepass", "onepass (default): hidden states and token scores read while "
                                              "the model answers; separate: a forward pass of their own after "
                                              "labelling.", stages=("generate", "extract", "baselines"))
    # what is read and how it is split
    sites: list[Site] = setting(None, "Where states are read: residual (default), mlp, attention.",
                                stages=("extract", "probe", "wholemap", "entropy"), flag="--sites", aliases=("--site",),
                                default_factory=lambda: ["residual"])
    positions: list[Position] = setting(None, "Token positions (the heatmap's columns), in order.",
                                        stages=("label", "entropy", "attention", "plot"),
                                        default_factory=lambda: list(DEFAULT_POSITIONS))
    seeds: list[Seed] = setting(None, "Split and probe seeds, e.g. --seeds 0 1 2 (default 0 1 2).",
                                stages=("label",), default_factory=lambda: [0, 1, 2])
    test_fraction: Annotated[float, Field(ge=0.05, le=0.95)] = setting(
        0.3, "Share of each split scored for the heatmap (default 0.3).", stages=("generate", "label"))
    validation_fraction: Annotated[float, Field(ge=0.05, le=0.9)] = setting(
        0.2, "Share of each split that chooses the best cell and region (default 0.2; train: the rest).",
        stages=("generate", "label"))
    population: Literal[POPULATIONS] = setting("common", "common (default): every column trained and tested on the same "
                                               "answers, those at which every position exists; each: every column on "
                                               "the answers where its position exists.", stages=("label",))
    exact_answer: Literal[EXACT_ANSWER_MODES] = setting(
        "blind", "blind (default): every answer's exact answer located without the gold answer, as a deployed "
                 "detector must; gold: a right answer's at its matched alias (the reference study).", stages=("label",))
    grader: Literal[GRADERS] = setting(
        "alias", "Which label becomes `correct`: alias (default): a gold alias occurs in the answer; strict: the "
                 "exact answer located without the gold equals a gold alias; lenient: the judge says the answer "
                 "means the same as the gold (runs the judge). All are kept: correct_alias, correct_strict, "
                 "correct_lenient.", stages=("label", "samples"))
    judge_grader: bool = setting(False, "Also grade by a judge (--extractor-model, or the studied model) asked whether "
                                 "each answer means the same as the gold, read from its next-token yes/no: "
                                 "correct_lenient; one forward pass per answer, and per sample (default: no).",
                                 stages=("label", "samples"))
    # the probes
    C: Annotated[float, Field(gt=0, le=1e12)] = setting(
        1.0, "Inverse L2 strength of each probe, as scikit-learn's C (default 1.0).",
        stages=("probe", "wholemap", "entropy"))
    bootstrap: Annotated[int, Field(ge=10, le=100_000)] = setting(
        1000, "Bootstrap resamples for AUC intervals (default 1000).",
        stages=("probe", "wholemap", "baselines", "entropy"))
    permutations: Annotated[int, Field(ge=0, le=100_000)] = setting(
        199, "Label permutations of the per-cell null, corrected over cells by the max statistic (default 199: "
        "smallest p 0.005; 0: no null).", stages=("wholemap",))
    min_per_class: Annotated[int, Field(ge=2, le=100_000)] = setting(
        MIN_PER_CLASS, f"Fewest right and fewest wrong answers each part of a split (train, validation, test) may "
        f"hold (default {MIN_PER_CLASS}; at least 2).", stages=("generate", "label", "probe", "entropy"))
    progress: bool = setting(True, "Progress bars (default); --quiet or --no-progress: none.", stages=ALL,
                             aliases=(" /--quiet",))
    # optional views
    also: list[Literal[ALSO]] = setting(None, "Extra views: attention (a heatmap of attention weights); samples "
                                        "(semantic entropy and semantic-entropy probes).", default_factory=list)
    samples: Annotated[int, Field(ge=2, le=1000)] = setting(
        5, "Sampled answers per question for --also samples, and for a study without gold answers (default 5).",
        stages=("samples",))
    sample_temperature: Annotated[float, Field(gt=0, le=100)] = setting(
        1.0, "Temperature of those samples (default 1.0).", stages=("samples",))
    judge_equivalence: bool = setting(False, "Also cluster the samples by meaning with a model judging two answers "
                                      "equivalent (--extractor-model, or the studied model): 2 forward passes per "
                                      "comparison.", stages=("samples",))
    p_true: Literal[P_TRUE_CHOICES] = setting("exact", "p(True) baselines: exact (default; the model asked whether its "
                                              "exact answer is true), both (also its whole answer, as the reference "
                                              "study; about twice the cost), none.", stages=("baselines",))
    # Ray (truthmap/backends/ray.py, docs/scaling.md): generation and extraction on workers of a Ray cluster
    ray: Word | None = setting(None, "Generate and extract on Ray workers: a new local cluster (no ADDRESS), auto, or "
                               "ray://HOST:10001. Needs pip install 'truthmap[ray]'. See docs/scaling.md.",
                               stages=RAY_STAGES, flag_value="local", metavar="[ADDRESS]", outside=True,
                               value="local, auto or ray://HOST:PORT")
    ray_workers: Annotated[int, Field(ge=1, le=100_000)] | None = setting(
        None, "At most N Ray workers, each loading the model (default: one per GPU, or per CPU).", stages=RAY_STAGES)
    ray_gpus_per_worker: Annotated[int, Field(ge=0, le=1024)] | None = setting(
        None, "GPUs per Ray worker: k > 1 spreads the model over k GPUs (default 1 if any).", stages=RAY_STAGES)
    ray_cpus_per_worker: Annotated[int, Field(ge=1, le=100_000)] = setting(
        1, "CPUs (and torch threads, on a CPU worker) per Ray worker (default 1).", stages=RAY_STAGES)

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise TruthmapError(explain(err, *_SOURCE.get())) from None

    def __setattr__(self, name, value):
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise TruthmapError(explain(err, "Config")) from None

    @field_validator("*", mode="before")
    @classmethod
    def _lists_from_tuples(cls, value):
        return list(value) if isinstance(value, tuple) else value  # the Python API's seeds=(0, 1)

    @field_validator("positions", "sites", "seeds", "also")
    @classmethod
    def _once_each(cls, values: list, info):
        if not values and info.field_name in ("positions", "sites", "seeds"):
            raise SettingError(info.field_name, "is empty; give at least one")
        if len(set(values)) != len(values):
            raise SettingError(info.field_name, f"{values!r}: each may appear once")
        return values

    @field_validator("prompt_template")
    @classmethod
    def _fillable(cls, template):
        if template is None:
            return template
        try:
            fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                      if name is not None]
        except ValueError as err:
            raise SettingError("prompt_template", f"{template!r} cannot be filled ({err}); write a literal brace "
                                                  f"as {{{{ or }}}}") from None
        names = [name for name, _, _ in fields]
        shaped = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                  for name, spec, conversion in fields if spec or conversion]
        if shaped:  # a format spec can pad a field to gigabytes ({question:>999999999})
            raise SettingError("prompt_template", f"{template!r} formats a field ({shaped[0]}); write the fields "
                                                  f"plainly: {{question}}")
        odd = [n for n in names if n not in PROMPT_FIELDS]
        if odd:
            raise SettingError("prompt_template", f"{template!r} names {{{odd[0]}}}; use only "
                                                  f"{', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
        if "question" not in names:
            raise SettingError("prompt_template", f"{template!r} must contain {{question}}")
        return template

    @model_validator(mode="after")
    def _together(self):
        if self.validation_fraction > 0.9 - self.test_fraction + 1e-9:
            raise SettingError("validation_fraction", f"{self.validation_fraction} with test_fraction "
                                                      f"{self.test_fraction} leaves train less than 0.1; use at most "
                                                      f"{0.9 - self.test_fraction:.2f}")
        return self

    def validate(self) -> "Config":
        """The same Config: every Config is checked when it is made (kept for code that calls it)."""
        return self

    def replace(self, **changes) -> "Config":
        """A copy with ``changes``, checked."""
        return Config(**{**self.to_dict(), **changes})

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        model = Path(self.model.split("::")[-1]).stem if self.model else "model"
        name = f"{model.replace('embedded:', '')}-{Path(self.dataset).stem}"
        return Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", name)

    def to_dict(self) -> dict:
        return self.model_dump()


SETTINGS = tuple(Config.model_fields)  # every setting's name, in declaration order
OUTSIDE = tuple(n for n, f in Config.model_fields.items() if (f.json_schema_extra or {}).get("outside"))  # never continued
# names that are not settings, and what to write instead (a hint in the error)
RENAMED = {"quiet": "progress=False (--quiet on the command line)", "site": "sites", "position": "positions",
           "seed": "seeds"}


def declaration(name: str) -> dict:
    """What the schema says of setting ``name``: help, stages, flag, aliases, outside, metavar, flag_value,
    default (None where it is computed), kind (bool, int, float, str, choice), choices, multiple, optional."""
    field = Config.model_fields[name]
    # a field declared without setting(): shown by `run` only (tests/unit/test_settings.py asks for its help)
    info = {"stages": RUN, "flag": None, "aliases": (), "outside": False, "metavar": None, "flag_value": None,
            "value": None, **(field.json_schema_extra or {})}
    info["help"] = field.description or ""
    info["default"] = field.get_default(call_default_factory=True)
    info["flag"] = info["flag"] or "--" + name.replace("_", "-")
    info.update(_kind(field.annotation))
    return info


def _kind(annotation) -> dict:
    optional = False
    if get_origin(annotation) in (Union, getattr(__import__("types"), "UnionType", Union)):
        args = [a for a in get_args(annotation) if a is not type(None)]
        optional, annotation = len(args) < len(get_args(annotation)), args[0]
    multiple = get_origin(annotation) is list
    if multiple:
        annotation = get_args(annotation)[0]
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return {"kind": "choice", "choices": tuple(get_args(annotation)), "multiple": multiple, "optional": optional}
    return {"kind": annotation.__name__, "choices": None, "multiple": multiple, "optional": optional}


# ---------------------------------------------------------------- reading settings, and saying what is wrong

def _what(value) -> str:
    """What a value is, in the words of a YAML or JSON user."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "null" if value is None else f"a {type(value).__name__}"


def _expected(name: str, item: bool = False) -> str:
    """How to write a good value of setting ``name`` (of one item of it: ``item``)."""
    info, field = declaration(name), Config.model_fields[name]
    bounds = {}
    for annotation in [field.annotation, *get_args(field.annotation)]:
        for meta in [*getattr(field, "metadata", []), *getattr(annotation, "__metadata__", [])]:
            for key in ("ge", "gt", "le", "lt"):
                if getattr(meta, key, None) is not None:
                    bounds[key] = getattr(meta, key)
            for inner in getattr(meta, "metadata", []):
                for key in ("ge", "gt", "le", "lt"):
                    if getattr(inner, key, None) is not None:
                        bounds[key] = getattr(inner, key)
    if info["kind"] == "bool":
        what = "true or false"
    elif info["kind"] == "choice":
        what = "one of " + ", ".join(map(str, info["choices"]))
    elif info["kind"] in ("int", "float"):
        what = "a whole number" if info["kind"] == "int" else "a finite number"
        shown = {k: (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in bounds.items() if v < 2**31 - 1}
        low = f"above {shown['gt']}" if "gt" in shown else shown.get("ge")
        if low and "le" in shown and "gt" not in shown:
            what += f" from {low} to {shown['le']}"
        elif low or "le" in shown:
            what += ", " + ", ".join(b for b in ((f"at least {low}" if "ge" in shown and "gt" not in shown else low),
                                                  f"at most {shown['le']}" if "le" in shown else "") if b)
    elif name == "positions":
        what = f"a position name ({', '.join(NAMED_POSITIONS)}, -1, -2, …)"
    else:
        what = info["value"] or "text"
    if info["multiple"] and not item:
        what = f"a list, each {what}"
    return what + (" (or null for the default)" if info["optional"] else "")


def explain(err: ValidationError, source: str, origins: dict | None = None) -> str:
    """One line for the first problem of ``err``: ``SOURCE: SETTING: VALUE is …; use …``.

    ``origins``: where each setting came from, where that differs from ``source``; for the command line,
    the setting is named by its flag."""
    from .runfolder import sanitise

    problem = err.errors(include_url=False)[0]
    kind, loc, value = problem["type"], problem["loc"], problem.get("input")
    name = str(loc[0]) if loc else ""
    custom = problem.get("ctx", {}).get("error")
    if isinstance(custom, SettingError):
        name = custom.name
    where = (origins or {}).get(name, source)
    shown = sanitise(repr(value), 60)
    if kind == "extra_forbidden":
        hint = RENAMED.get(name) or ", ".join(difflib.get_close_matches(name, SETTINGS, n=2))
        return (f"{where}: unknown setting {sanitise(repr(name), 60)}" + (f"; did you mean {hint}?" if hint else "")
                + f" (the settings: {', '.join(SETTINGS)})")
    label = declaration(name)["flag"] if where == "the command line" and name in SETTINGS else name
    item = len(loc) > 1 and isinstance(loc[1], int)  # one item of a list setting
    use = _expected(name, item) if name in SETTINGS else ""
    if isinstance(custom, SettingError):
        text = custom.text
    elif isinstance(custom, ValueError):
        text = f"{shown} {custom}" + (f"; use {use}" if use not in ("", "text") else "")
    elif kind.endswith("_type") or kind in ("literal_error", "enum"):
        if kind == "literal_error" and isinstance(value, str):
            text = f"{shown} is not a choice; use {use}"
        elif kind in ("int_from_float", "int_type") and isinstance(value, float):
            text = f"{shown} is not a whole number; use {use}"
        elif name == "positions" and isinstance(value, int):
            text = f"{shown} is a number; a position is a name: write it quoted, '{value}'"
        else:
            text = f"{shown} is {_what(value)}; use {use}"
    elif kind == "finite_number":
        text = f"{shown} is not a finite number; use {use}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        text = f"{shown} is out of range; use {use}"
    else:
        text = f"{shown}: {problem['msg']}; use {use}" if name in SETTINGS else problem["msg"]
    if item and not isinstance(custom, SettingError):
        text = f"item {loc[1] + 1}: " + text
    return f"{where}: {label}: {text}"


def make_config(values: dict, source: str, origins: dict | None = None) -> Config:
    """A Config from ``values`` (read from ``source``); a one-line TruthmapError naming the setting and the
    source of the first value that fails."""
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise TruthmapError(f"{source}: unknown setting {odd[0]!r} (the settings: {', '.join(SETTINGS)})")
    token = _SOURCE.set((source, origins))
    try:
        return Config(**values)
    finally:
        _SOURCE.reset(token)


def read_yaml(path: str | Path) -> dict:
    """The settings of a YAML file: a mapping of setting: value (its keys checked against the schema later)."""
    import yaml

    path = Path(path)
    try:
        if path.stat().st_size > 1_000_000:
            raise TruthmapError(f"{path}: more than 1 MB; a config file is a short mapping of setting: value")
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TruthmapError(f"{path}: could not read the config ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError as err:
        raise TruthmapError(f"{path}: not UTF-8 text (byte {err.start}); re-save it as UTF-8") from None
    except RecursionError:
        raise TruthmapError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(values, dict):
        raise TruthmapError(f"{path}: a config file is a mapping of setting: value")
    return values


def settings_from(path: str | Path | None, overrides: dict, source: str) -> Config:
    """A Config from a YAML file (keys = setting names) with the non-None ``overrides`` (from ``source``:
    the command line, the Python API) on top; errors name the file or the source of the failing value."""
    values = read_yaml(path) if path is not None else {}
    origins = {name: str(path) for name in values}
    given = {k: v for k, v in overrides.items() if v is not None}
    origins.update({name: source for name in given})
    values.update(given)
    return make_config(values, str(path) if path is not None else source, origins)


def load_config(path: str | Path | None, **overrides) -> Config:
    """A Config from a YAML file (keys = setting names), with non-None ``overrides`` applied on top."""
    return settings_from(path, overrides, "load_config()")


def check_setting(name: str, value, source: str):
    """``value`` checked as setting ``name`` (for a setting read elsewhere, e.g. a detector card's model);
    a one-line TruthmapError naming the setting and ``source``."""
    return getattr(make_config({name: value}, source), name)


def settings_table() -> str:
    """docs/settings.md: every setting's YAML key and Python keyword, flag, values, default, stage commands
    and help, from the declarations above (tests/unit/test_docs_match_cli.py checks the file is this)."""
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")

    lines = [
        "# Settings",
        "",
        "<!-- generated from the declarations in truthmap/config.py: python -c \"from truthmap.config import "
        "settings_table; print(settings_table(), end='')\" > docs/settings.md -->",
        "",
        "Every setting has one name: the key in a `--config FILE` YAML file, the keyword of `truthmap.run()` and "
        "`truthmap.config.Config()`, and — with `-` for `_` — the flag of `truthmap run` (`progress: false` in "
        "YAML is `--quiet` or `--no-progress`; `sites` is `--sites`, also spelled `--site`; `C` is `--C`, "
        "scikit-learn's name, capital kept). A stage command (`truthmap generate`, `label`, …) takes the "
        "settings of its stage, listed below and by its `--help`; the run's other settings are continued from "
        "its `config.json`, except those marked *outside*, which name what is read or run and come only from "
        "the command line or `--config`.",
        "",
        "Values are checked strictly, whatever their source: a YAML `\"false\"` (quoted) is a string, not a "
        "boolean, and is refused; numbers must be finite and in range; a bad value is one line naming the "
        "source and the setting.",
        "",
        "| setting | flag | value | default | stage commands | what it does |",
        "|---|---|---|---|---|---|",
    ]
    for name in SETTINGS:
        info = declaration(name)
        flags = ", ".join(f"`{f.strip(' /')}`" for f in (info["flag"], *info["aliases"]))
        if info["kind"] == "bool":
            flags = f"`{info['flag']}` / `--no-{info['flag'][2:]}`" + "".join(
                f", `{a.strip(' /')}`" for a in info["aliases"])
        default = info["default"]
        default = "—" if default is None else ", ".join(map(str, default)) if isinstance(default, list) else default
        default = str(default).lower() if isinstance(info["default"], bool) else default
        stages = "every one" if info["stages"] == ALL else ", ".join(info["stages"]) or "run only"
        outside = " *(outside)*" if info["outside"] else ""
        lines.append(f"| `{name}`{outside} | {flags} | {cell(_expected(name))} | {cell(default) or '—'} | "
                     f"{stages} | {cell(info['help'])} |")
    return "\n".join(lines) + "\n"


def saved_settings(path: str | Path, required: bool = True) -> dict:
    """The settings a run saved in its config.json (read through the manifest check), each checked by the
    schema: {setting: value} for the keys the schema knows (another version's extra keys are left out). A
    bad value is one line naming the file and the setting. Missing file: an error, or {} if not ``required``."""
    from . import runfolder as rf

    path = Path(path)
    if not required and not path.exists():
        return {}
    saved = rf.read_json_object(path)
    values = {k: v for k, v in saved.items() if k in SETTINGS}
    config = make_config(values, str(path))
    return {k: getattr(config, k) for k in values}
