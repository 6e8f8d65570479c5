from pathlib import Path

import pytest

from truthmap.cli import app, expand_multi_value
from truthmap.config import Config, load_config
from truthmap.errors import TruthmapError


def test_multi_value_options_expand():
    argv = ["run", "--seeds", "0", "1", "2", "--limit", "5", "--positions", "last_q", "-1", "--quiet"]
    assert expand_multi_value(argv) == [
        "run", "--seeds", "0", "--seeds", "1", "--seeds", "2", "--limit", "5",
        "--positions", "last_q", "--positions", "-1", "--quiet",
    ]


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("limit: 40\nseeds: [3, 4]\nsites: [mlp]\n")
    cfg = load_config(path, limit=10)
    assert (cfg.limit, cfg.seeds, cfg.sites) == (10, [3, 4], ["mlp"])


def test_yaml_unknown_setting_is_named(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("limt: 40\n")
    with pytest.raises(TruthmapError, match="unknown setting.*limt"):
        load_config(path)


@pytest.mark.parametrize("field,value,message", [
    ("sites", ["mlps"], "sites: item 1: 'mlps' is not a choice; use one of residual, mlp, attention"),
    ("positions", ["exact_middle"], "positions: item 1: 'exact_middle' is not a position"),
    ("prompt_template", "Answer briefly.", "must contain"),
    ("p_true", "whole", "p_true: 'whole' is not a choice; use one of exact, both, none"),
])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(TruthmapError, match=message):
        Config(**{field: value}).validate()


def test_run_folder_name_from_model_and_dataset():
    assert str(Config().run_dir()) == "runs/smollm2-135m-instruct-facts"
    assert str(Config(model="org/My Model", dataset="/data/trivia.csv").run_dir()) == "runs/My_Model-trivia"


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "q.csv"
    bad.write_text("query,answer\nWhat?,x\n")
    with pytest.raises(SystemExit) as exit_:
        app(["run", "--dataset", str(bad), "--out", str(tmp_path / "run"), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing column 'question'" in err and len(err.splitlines()) == 1


def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(monkeypatch, capsys):
    import truthmap.cli as cli_module

    def broken(**_):
        raise ZeroDivisionError("a bug inside truthmap")

    monkeypatch.setattr(cli_module.cli, "main", broken)
    with pytest.raises(SystemExit) as exit_:
        app(["run", "--quiet"])
    assert exit_.value.code == 1  # not 2: the input was not at fault
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and "ZeroDivisionError: a bug inside truthmap" in err
    assert err[-1].startswith("error: an internal error of truthmap, not a problem with your input (truthmap ")
    assert "please report it" in err[-1]


def test_an_unknown_model_fails_first_and_offline_asks_no_network(tmp_path, capsys, monkeypatch):
    """The unknown model is the error, before any question is read or any weight loaded; with
    HF_HUB_OFFLINE=1 set after the hub library was imported (as in a notebook), its files are not asked
    of the network (the library reads the variable once, on import, and would otherwise retry for a minute)."""
    import socket

    import huggingface_hub.constants  # noqa: F401  (read before the variable is set)

    import truthmap.backends.hf

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(what)
        return fail

    looked_up = []  # recorded: the hub library takes a failed look-up for a network down, retries, and goes on

    def lookup(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr("truthmap.data.load_questions", forbidden("the questions were read before the model was found"))
    monkeypatch.setattr(truthmap.backends.hf, "_load", forbidden("the model was loaded before it was found"))
    with pytest.raises(SystemExit) as exit_:
        app(["generate", "--model", "no-such-org/no-such-model", "--limit", "3", "--out", str(tmp_path / "run"), "--quiet"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'no-such-org/no-such-model': could not be loaded") and len(err.splitlines()) == 1
    assert "HF_HUB_OFFLINE=1 is set" in err
    assert not (tmp_path / "run" / "questions.parquet").exists()
    # the model's files are not asked for (that is a look-up per retry, and a line on stderr each); the
    # hub library may still ask once for a registry it puts in its user-agent header
    assert len(looked_up) <= 1


def test_auto_and_what_it_means_here_load_the_model_once(monkeypatch):
    """A study run with the default settings ("auto") and a caller that names the dtype and device they
    mean on this machine share one load; another dtype loads again, and one model at most is kept."""
    import truthmap.backends.hf as models

    loads = []
    monkeypatch.setattr(models, "_LOADED", {})
    monkeypatch.setattr(models, "_load", lambda *asked: loads.append(asked) or object())
    where = models.resolve_device("auto")
    meaning = str(models._torch_dtype("auto", where)).removeprefix("torch.")
    first = models.load_model("some/model", "auto", "auto")
    assert models.load_model("some/model", meaning, where) is first and len(loads) == 1
    assert loads[0][1:3] == ("auto", "auto")  # the load itself is asked what the caller asked
    other = "float16" if meaning != "float16" else "float32"
    assert models.load_model("some/model", other, where) is not first and len(loads) == 2
    assert models.load_model("some/model") is not first and len(loads) == 3 and len(models._LOADED) == 1


# ---------------------------------------------------------------- one way to name a run on the command line

def _cli(argv, capsys):
    """(exit status, stdout, stderr lines) of the CLI."""
    try:
        app(argv)
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def test_every_command_reads_its_run_as_an_argument_and_writes_to_out():
    from truthmap.cli import cli

    def names(command, kind):
        return {p.name for p in cli.commands[command].params if isinstance(p, kind) and not getattr(p, "hidden", False)}

    import click

    for command in ("export", "resample", "choose"):
        assert names(command, click.Argument) == {"run"}, command
    assert names("report", click.Argument) == {"runs"}
    for command in ("run", "generate", "label", "extract", "probe", "plot", "report", "export", "transfer", "score"):
        assert "out" in names(command, click.Option), command
    for command in ("resample", "choose"):  # they add their files to the run they read: no second place
        assert "out" not in names(command, click.Option) and "old_out" not in names(command, click.Option)
    assert "to" not in names("export", click.Option) | names("transfer", click.Option)  # old spelling, hidden


def test_export_reads_the_run_argument_and_writes_out_old_spelling_warns(tmp_path, capsys):
    from _synthetic import make_run

    run = make_run(tmp_path / "run")
    status, out, err = _cli(["export", str(run), "--layer", "1", "--position", "-1", "--out", str(tmp_path / "new")],
                            capsys)
    assert status == 0 and (tmp_path / "new" / "card.json").is_file() and not err
    # truthmap 0.1: --out named the run and --to the detector folder; it still works, and says the new spelling
    status, out, err = _cli(["export", "--out", str(run), "--layer", "1", "--position", "-1",
                             "--to", str(tmp_path / "old")], capsys)
    assert status == 0 and (tmp_path / "old" / "card.json").is_file()
    assert [line for line in err if "deprecated" in line] == [
        "truthmap: warning: 'truthmap export --out RUN' is deprecated and goes in the next release; "
        "use 'truthmap export RUN'",
        "truthmap: warning: 'truthmap export --to DIR' is deprecated and goes in the next release; "
        "use 'truthmap export --out DIR'"]
    # the old form without --to: the detector goes to its default folder inside the run
    status, _, err = _cli(["export", "--out", str(run), "--site", "residual", "--layer", "1", "--position", "-1"],
                          capsys)
    assert status == 0 and (run / "detectors" / "residual-L1--1" / "card.json").is_file() and len(err) == 1
    status, _, err = _cli(["export", str(run), "--out", str(tmp_path / "a"), "--to", str(tmp_path / "b")], capsys)
    assert status == 2 and err[-1] == "error: export: give --out once (--to is its old name)"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("command", ["resample", "choose"])
def test_resample_and_choose_read_the_run_argument_old_out_warns(tmp_path, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    status, _, err = _cli([command, str(mine)], capsys)
    assert status == 2 and str(mine) in err[-1] and "not a run folder" in err[-1] and len(err) == 1
    status, _, err = _cli([command, "--out", str(mine)], capsys)  # truthmap 0.1's spelling: the same run
    assert status == 2 and str(mine) in err[-1] and "not a run folder" in err[-1]
    assert err[0] == (f"truthmap: warning: 'truthmap {command} --out RUN' is deprecated and goes in the next "
                      f"release; use 'truthmap {command} RUN'")
    status, _, err = _cli([command], capsys)
    assert status == 2 and err == [f"error: {command}: name the run folder to read: truthmap {command} RUN"]
    status, _, err = _cli([command, str(mine), "--out", str(tmp_path / "other")], capsys)
    assert status == 2 and "give the run once" in err[-1]


def test_transfer_writes_to_out_and_old_to_warns(tmp_path, capsys, monkeypatch):
    import pandas as pd

    import truthmap.analyses.transfer

    seen = []

    def fake_run_transfer(train, test, **kwargs):
        seen.append(kwargs["out"])
        return Path(kwargs["out"]), pd.DataFrame({"b": [0.7]}, index=["a"])

    monkeypatch.setattr(truthmap.analyses.transfer, "run_transfer", fake_run_transfer)
    base = ["transfer", "--train", "runs/a", "--test", "runs/b", "--layer", "1", "--position", "-1"]
    status, _, err = _cli(base + ["--out", str(tmp_path / "t")], capsys)
    assert status == 0 and not err
    status, _, err = _cli(base + ["--to", str(tmp_path / "t")], capsys)
    assert status == 0 and err == ["truthmap: warning: 'truthmap transfer --to DIR' is deprecated and goes in the "
                                   "next release; use 'truthmap transfer --out DIR'"]
    assert seen == [str(tmp_path / "t")] * 2


def test_a_one_cell_command_takes_one_site_so_the_run_after_it_stays_the_run():
    assert expand_multi_value(["export", "--site", "mlp", "runs/a"]) == ["export", "--site", "mlp", "runs/a"]
    assert expand_multi_value(["run", "--site", "mlp", "residual"]) == ["run", "--site", "mlp", "--site", "residual"]


def test_score_out_needs_a_file(capsys):
    status, _, err = _cli(["score", "--detector", "d", "--question", "q", "--answer", "a", "--out", "x.csv"], capsys)
    assert status == 2 and err == ["error: --out is where the scores of --file go; give --file pairs.csv"]


@pytest.mark.parametrize("content,where", [
    (b"question,answer\nWho?,Ann\nWhere?,Rome,Italy\n", "line 3"),  # a row with a field too many
    (b"question,answer\nWho?,Ren\xe9\n", "not UTF-8"),
    (b"", "empty"),
])
def test_a_bad_pairs_file_is_one_line_naming_the_file_and_where(tmp_path, capsys, monkeypatch, content, where):
    import truthmap.data as data

    read = []
    plain_errors = data._plain_errors
    monkeypatch.setattr(data, "_plain_errors", lambda path, reader: read.append(path) or plain_errors(path, reader))
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(content)
    status, out, err = _cli(["score", "--detector", str(tmp_path / "no-detector"), "--file", str(pairs)], capsys)
    assert status == 2 and len(err) == 1 and "Traceback" not in out
    assert err[0].startswith(f"error: {pairs}: ") and where in err[0]
    assert read == [pairs]  # read as every question file is, by data.py
