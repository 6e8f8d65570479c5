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
    ("sites", ["mlps"], "site 'mlps'"),
    ("positions", ["exact_middle"], "position 'exact_middle'"),
    ("prompt_template", "Answer briefly.", "must contain"),
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
