"""The typed settings schema (truthmap/config.py): every source — the command line, ``--config`` YAML, a
run's saved config.json, the Python API, an attribute set on a Config — goes through it; a bad value is
one line naming the source and the setting, and is never saved; saved settings never choose what is read.
"""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from truthmap import runfolder as rf
from truthmap.cli import app
from truthmap.config import SETTINGS, Config, declaration, load_config, make_config, settings_from
from truthmap.errors import TruthmapError
from truthmap.pipeline import continue_config


def exit_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        app(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines) and lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize("text", ['"false"', "'no'", '"0"', "off_"])
def test_a_quoted_false_is_an_error_never_true(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"trust_remote_code: {text}\nmodel: ./evil\n")
    with pytest.raises(TruthmapError) as err:
        load_config(path)
    value = text.strip("'\"")
    assert str(err.value) == f"{path}: trust_remote_code: {value!r} is a string; use true or false"


@pytest.mark.parametrize("text,says", [
    ("C: .inf", "C: inf is not a finite number"),
    ("test_fraction: 1.0e+400", "test_fraction: inf is not a finite number"),
    ("sample_temperature: .nan", "sample_temperature: nan is not a finite number"),
    ("limit: 2.5", "limit: 2.5 is not a whole number"),
    ("positions: [-1]", "positions: item 1: -1 is a number; a position is a name: write it quoted, '-1'"),
    ("seeds: 3", "seeds: 3 is a number; use a list, each a whole number"),
    ("out: [a, b]", "out: ['a', 'b'] is a list; use a folder"),
    ("site: [mlp]", "unknown setting 'site'; did you mean sites?"),
    ("prompt_template: '{question.x}'", "prompt_template: '{question.x}' names {question.x}; use only {question}"),
    ("prompt_template: '{question:>999999999}'", "prompt_template: '{question:>999999999}' formats a field"),
    ("prompt_template: \"Q: {question}\\u0000\"", "prompt_template: 'Q: {question}\\x00' holds a control character"),
])
def test_yaml_values_of_the_wrong_kind_are_named(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text + "\n")
    with pytest.raises(TruthmapError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: {says}")


def test_each_source_is_named_with_the_setting(tmp_path, capsys):
    yaml = tmp_path / "c.yaml"
    yaml.write_text("bootstrap: -5\n")
    with pytest.raises(TruthmapError, match=rf"^{yaml}: bootstrap: -5 is out of range; use a whole number from 10"):
        load_config(yaml)
    # the command line names the flag, and a value given there wins over the file's
    line = exit_line(["run", "--bootstrap", "-5", "--out", str(tmp_path / "r1"), "--quiet"], capsys)
    assert line.startswith("error: the command line: --bootstrap: -5 is out of range")
    assert settings_from(yaml, {"bootstrap": 200}, "the command line").bootstrap == 200
    yaml.write_text("limit: 40\n")
    line = exit_line(["run", "--config", str(yaml), "--positions", "-²", "--out", str(tmp_path / "r2"), "--quiet"],
                     capsys)
    assert line == ("error: the command line: --positions: item 1: '-²' is not a position; use a position name "
                    "(last_q, first_answer, second_answer, exact_answer_before_first, exact_answer_first, "
                    "exact_answer_last, exact_answer_after_last, -1, -2, …)")
    # nothing was made or saved for either refused command
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    import truthmap

    with pytest.raises(TruthmapError, match=r"^truthmap.run\(\): unknown setting 'quiet'; did you mean "
                                            r"progress=False .*\(the settings: model, dataset, "):
        truthmap.run(quiet=True)
    with pytest.raises(TruthmapError, match=r"^Config\(\): unknown setting 'limt'; did you mean limit\?"):
        Config(limt=4)
    config = Config()
    with pytest.raises(TruthmapError, match=r"^Config: seeds: item 2: '1' is a string; use a whole number"):
        config.seeds = [0, "1"]
    assert config.seeds == [0, 1, 2]  # an assignment that fails changes nothing


@pytest.mark.parametrize("name,value,says", [
    ("positions", [1], "positions: item 1: 1 is a number; a position is a name: write it quoted, '1'"),
    ("bootstrap", -5, "bootstrap: -5 is out of range"),
    ("C", "x", "C: 'x' is a string; use a finite number, above 0"),
    ("limit", "5", "limit: '5' is a string; use a whole number"),
    ("samples", True, "samples: True is a boolean; use a whole number from 2 to 1000"),
    ("sites", "mlp", "sites: 'mlp' is a string; use a list, each one of residual, mlp, attention"),
])
def test_a_bad_saved_setting_is_one_line_naming_config_json(tmp_path, name, value, says):
    run = tmp_path / "run"
    with rf.open_run(run):
        saved = {**Config().to_dict(), name: value}
        rf.write_json(run / rf.CONFIG, saved)
        with pytest.raises(TruthmapError) as err:
            continue_config(Config(out=str(run)), run, frozenset({"out"}), ("probe",))
    assert str(err.value).startswith(f"{run / rf.CONFIG}: {says}")
    assert str(err.value).endswith("; give the setting on the command line or rerun the run")
    # given on the command line, the saved value is not used, and the folder's file is not the error
    with rf.open_run(run):
        good = Config().to_dict()[name]
        config = continue_config(Config(out=str(run), **{name: good}), run, frozenset({"out", name}), ("probe",))
    assert getattr(config, name) == good


def test_saved_settings_never_choose_what_is_read(tmp_path, capsys):
    """A sealed config.json naming a dataset file outside the folder: generate does not read it; a stage
    that reads no dataset keeps the run's name for its titles."""
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("question,answer\nWho?,Ann\n")
    run = tmp_path / "run"
    with rf.open_run(run):
        rf.write_json(run / rf.CONFIG, {**Config().to_dict(), "dataset": str(outside), "data_dir": str(tmp_path)})
        with pytest.raises(TruthmapError, match=r"this run had dataset .*elsewhere.csv'; give --dataset "):
            continue_config(Config(out=str(run)), run, frozenset({"out"}), ("generate", "label"))
        config = continue_config(Config(out=str(run)), run, frozenset({"out"}), ("probe", "plot"))
        assert config.dataset == str(outside) and config.data_dir is None  # titles only; no folder continued
        given = continue_config(Config(out=str(run), dataset="facts"), run, frozenset({"out", "dataset"}),
                                ("generate",))
        assert given.dataset == "facts"
    # through the CLI: refused before anything is read
    line = exit_line(["generate", "--out", str(run), "--quiet"], capsys)
    assert "give --dataset" in line and "never taken from a run folder" in line
    assert not (run / rf.QUESTIONS).exists()


def test_every_setting_is_declared_with_help_and_stages():
    from truthmap.pipeline import STAGE_TABLE

    for name in SETTINGS:
        info = declaration(name)
        assert info["help"].strip() and info["help"].endswith("."), name
        assert info["stages"] == "all" or set(info["stages"]) <= set(STAGE_TABLE), name
    # every setting a stage's fingerprint depends on is declared as used by that stage (its --help shows it)
    for stage in STAGE_TABLE.values():
        for name in set(stage.settings(Config())) & set(SETTINGS):
            stages = declaration(name)["stages"]
            assert stages == "all" or stage.name in stages, (stage.name, name)


# ---------------------------------------------------------------- property: wrong values are refused, never saved

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=12)
                       | st.floats(allow_nan=True, allow_infinity=True),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2),
                       max_leaves=6)


def _fits(name: str, value) -> bool:
    """Whether ``value`` has the type the declaration asks (the range and choices aside)."""
    info = declaration(name)
    if value is None:
        return info["optional"]
    items = value if info["multiple"] else [value]
    if info["multiple"] and not isinstance(value, list):
        return False
    kinds = {"bool": lambda v: isinstance(v, bool), "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
             "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
             "str": lambda v: isinstance(v, str), "choice": lambda v: v in info["choices"]}
    return all(kinds[info["kind"]](v) for v in items)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(SETTINGS), value=JSONISH)
def test_wrong_values_are_refused_and_what_is_accepted_reads_back(name, value):
    try:
        config = make_config({name: value}, "c.yaml")
    except TruthmapError as err:
        line = str(err)
        assert line.startswith(f"c.yaml: {name}: ") and "\n" not in line
        return
    assert _fits(name, value), (name, value)  # a value of the wrong type (a string for a bool, …) never passes
    saved = json.loads(json.dumps(config.to_dict(), allow_nan=False))  # what a run writes into config.json
    assert Config(**saved) == config  # and reads back as the same valid settings


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from([n for n in SETTINGS if declaration(n)["kind"] == "bool"]),
       text=st.text(max_size=8))
def test_no_string_is_ever_a_boolean(name, text):
    with pytest.raises(TruthmapError, match=f"{name}: .* is a string; use true or false"):
        make_config({name: text}, "c.yaml")


# ---------------------------------------------------------------- the CLI is generated from the declarations

def _options(command: str) -> dict:
    """{param name: click option} of a command, --help left out."""
    import click

    from truthmap.cli import cli

    return {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option) and p.name != "help"}


def test_every_setting_has_a_flag_of_its_name_and_run_takes_them_all():
    options = _options("run")
    assert set(options) == set(SETTINGS) | {"config_file", "force"}
    for name in SETTINGS:
        flags = options[name].opts
        assert flags[0] == "--" + name.replace("_", "-"), (name, flags)  # C: --C, sites: --sites
    assert "--site" in options["sites"].opts and "--quiet" in options["progress"].secondary_opts


def _stage_commands() -> list[str]:
    from truthmap.cli import cli
    from truthmap.pipeline import STAGES

    return [name for name in STAGES if name in cli.commands and name != "report"]  # `report RUNS…` is its own


def test_every_stage_but_the_report_has_a_command():
    from truthmap.pipeline import STAGES

    assert set(_stage_commands()) == set(STAGES) - {"report"}


@pytest.mark.parametrize("stage", _stage_commands())
def test_a_stage_command_takes_and_shows_its_own_settings_only(stage, capsys):
    from truthmap.cli import cli

    mine = {n for n in SETTINGS if declaration(n)["stages"] == "all" or stage in declaration(n)["stages"]}
    assert set(_options(stage)) == mine | {"config_file", "force"}
    assert {"model", "dataset", "out", "progress"} <= mine  # the run folder's name and --quiet, everywhere
    helped = cli.commands[stage].get_help(cli.make_context(stage, [], resilient_parsing=True))
    others = [n for n in SETTINGS if n not in mine]
    assert others and not [n for n in others if declaration(n)["flag"] + " " in helped]


def test_run_help_names_every_stage_a_run_does():
    from truthmap.cli import cli
    from truthmap.pipeline import STAGES

    text = cli.commands["run"].help
    assert [s for s in STAGES if s not in text] == []


def _a_value(name: str):
    """(command-line words, the value the Config should hold) for setting ``name``, not its default."""
    info, default = declaration(name), Config().to_dict()[name]
    flag = info["flag"]
    if info["kind"] == "bool":
        return ([flag] if not default else [f"--no-{flag[2:]}"]), not default
    if info["kind"] == "choice":
        choice = [c for c in info["choices"] if c not in (default if info["multiple"] else [default])][0]
        return [flag, choice], [choice] if info["multiple"] else choice
    special = {"positions": (["-3", "last_q"], ["-3", "last_q"]), "prompt_template": (["Q: {question}"], "Q: {question}"),
               "seeds": (["4", "5"], [4, 5]), "device": (["cpu"], "cpu"), "ray": (["auto"], "auto"),
               "validation_fraction": (["0.25"], 0.25), "test_fraction": (["0.25"], 0.25)}
    if name in special:
        words, value = special[name]
        return [flag, *words], value
    if info["kind"] == "int":
        return [flag, "12"], 12
    if info["kind"] == "float":
        return [flag, "0.5"], 0.5
    return [flag, "some-text"], "some-text"


@pytest.mark.parametrize("name", SETTINGS)
def test_each_flag_reaches_its_setting_with_its_type(name, monkeypatch, tmp_path):
    import truthmap.pipeline

    seen = {}
    monkeypatch.setattr(truthmap.pipeline, "run_stages",
                        lambda config, **kw: seen.update(config=config, given=kw["given"]) or tmp_path)
    monkeypatch.setattr("truthmap.cli._report", lambda run_dir: None)
    words, value = _a_value(name)
    app(["run", *words])
    assert getattr(seen["config"], name) == value and seen["given"] == {name}


def test_old_spellings_still_work(monkeypatch, tmp_path):
    import truthmap.pipeline

    seen = []
    monkeypatch.setattr(truthmap.pipeline, "run_stages", lambda config, **kw: seen.append(config) or tmp_path)
    monkeypatch.setattr("truthmap.cli._report", lambda run_dir: None)
    app(["probe", "--quiet", "--site", "mlp", "attention", "--C", "0.25"])
    assert (seen[-1].progress, seen[-1].sites, seen[-1].C) == (False, ["mlp", "attention"], 0.25)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("progress: false\nray_cpus_per_worker: 2\nprompt_template: 'Q: {question}'\n")
    app(["generate", "--config", str(yaml)])  # a YAML setting is not overridden by a flag not given
    assert (seen[-1].progress, seen[-1].ray_cpus_per_worker, seen[-1].prompt_template) == (False, 2, "Q: {question}")


def test_a_setting_of_another_stage_says_which_stage_uses_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        app(["probe", "--limit", "5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "Error: probe does not use --limit (a setting of generate); 'truthmap probe --help' lists its settings"


def test_a_position_of_non_ascii_digits_is_one_line_everywhere(capsys):
    """"-²".isdigit() is true in Python; a cell named by it is refused, not a ValueError from int()."""
    from truthmap.analyses.resample import check_cell

    with pytest.raises(TruthmapError, match="position '-²' is not a position name"):
        check_cell("residual", 3, "-²", "the cell")
    with pytest.raises(TruthmapError, match="positions: item 1: '-٣' is not a position"):
        Config(positions=["-٣"])  # an Arabic-Indic three


@pytest.mark.parametrize("field,raw,says", [
    ("C", '"x"', "C: 'x' is a string; use a finite number, above 0"),
    ("C", "1e400", "1e400 is beyond the range of a number"),  # refused by the strict JSON reader itself
    ("model", "5", "model: 5 is a number; use a hub id, a local folder or .gguf file"),
    ("max_new_tokens", "true", "max_new_tokens: True is a boolean; use a whole number"),
    ("layer", "1e400", "1e400 is beyond the range of a number"),
    ("position", '"-\u00b2"', "position '-²' is not a position name"),
])
def test_a_detector_cards_settings_go_through_the_schema(tmp_path, field, raw, says):
    """The card's model, C and max_new_tokens are checked as the settings they are; its cell by check_cell
    (JSON's 1e400 is an infinity, which int() cannot take)."""
    from safetensors.numpy import save_file
    import numpy as np

    from truthmap.analyses.detector import Detector

    folder = tmp_path / "det"
    folder.mkdir()
    save_file({"mean": np.zeros(3, np.float32), "scale": np.ones(3, np.float32), "coef": np.ones(3, np.float32),
               "intercept": np.zeros(1)}, str(folder / "detector.safetensors"))
    card = {"model": "m", "site": "residual", "layer": 3, "position": "-1", "threshold": 0.5, "C": 1.0}
    text = json.dumps(card).replace(json.dumps(field) + ": " + json.dumps(card.get(field)), f'"{field}": {raw}')
    if field not in card:
        text = text[:-1] + f', "{field}": {raw}}}'
    (folder / "card.json").write_text(text)
    with pytest.raises(TruthmapError) as err:
        Detector.load(folder)
    assert says in str(err.value) and str(folder) in str(err.value)


def test_a_prompt_template_keeps_its_lines():
    template = "Answer the question.\n\nQ: {question}\nA:"
    assert Config(prompt_template=template).prompt_template == template
    assert len(Config(prompt_template="x" * 20_000 + "{question}").prompt_template) == 20_010


def test_an_analysis_reads_the_runs_settings_through_the_schema(tmp_path):
    from truthmap.config import saved_settings

    run = tmp_path / "run"
    with rf.open_run(run):
        rf.write_json(run / rf.CONFIG, {**Config().to_dict(), "max_new_tokens": "24", "from_a_newer_version": 1})
        with pytest.raises(TruthmapError, match=rf"^{run / rf.CONFIG}: max_new_tokens: '24' is a string; use a whole"):
            saved_settings(run / rf.CONFIG)
        rf.write_json(run / rf.CONFIG, {"protocol": "reference", "max_new_tokens": 40, "from_a_newer_version": 1})
        assert saved_settings(run / rf.CONFIG) == {"protocol": "reference", "max_new_tokens": 40}
    assert saved_settings(tmp_path / "none.json", required=False) == {}


class _Seen(Exception):
    pass


@pytest.mark.parametrize("name", SETTINGS)
def test_each_setting_is_a_yaml_key_and_a_python_keyword_of_its_name(name, monkeypatch, tmp_path):
    """One name everywhere: the flag (above), the key of a --config YAML file and the keyword of
    truthmap.run() give the same setting the same value."""
    import yaml

    import truthmap
    import truthmap.pipeline
    from truthmap.config import load_config

    _, value = _a_value(name)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({name: value}))
    assert getattr(load_config(path), name) == value
    seen = {}

    def fake_run_stages(config, **kw):
        seen["config"] = config
        raise _Seen

    monkeypatch.setattr(truthmap.pipeline, "run_stages", fake_run_stages)
    with pytest.raises(_Seen):
        truthmap.run(**{name: value})
    assert getattr(seen["config"], name) == value


@pytest.mark.parametrize("command", ["score", "ask"])
def test_score_and_ask_take_the_model_settings_from_their_declarations(command, capsys, tmp_path):
    """--model, --dtype and --device of the detector commands are the settings' own options (choices,
    help) and their values are checked as the settings are: a bad one is one line naming its flag."""
    from truthmap.cli import app

    options = _options(command)
    for name in ("dtype", "device"):
        assert options[name].opts == _options("run")[name].opts and options[name].help == declaration(name)["help"]
    assert list(options["dtype"].type.choices) == list(declaration("dtype")["choices"])
    words = ["--detector", str(tmp_path / "no-such-detector"), "--device", "cuda 0"]
    words = ["a question?", *words] if command == "ask" else ["--question", "q?", "--answer", "a", *words]
    with pytest.raises(SystemExit) as exit_:
        app([command, *words])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and line.startswith("error: the command line: --device: 'cuda 0'"), line
