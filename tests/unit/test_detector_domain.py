"""The card of an exported detector says what it was trained on: the model's own answers (its domain)."""

import json

from _synthetic import make_run, seal
from truthmap.analyses.detector import export_detector


def test_the_card_names_its_domain_and_the_runs_protocol(tmp_path):
    run = make_run(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "protocol": "reference"}))
    seal(run)  # as truthmap would have listed the file it wrote
    card = json.loads((export_detector(run, site="residual", layer=1, position="-1", out=tmp_path / "det") / "card.json").read_text())
    domain = card["domain"]
    assert domain["protocol"] == "reference" and "reference" in domain["answers"]
    assert "tiny-model itself" in domain["answers"] and "8 new tokens" in domain["answers"]
    assert domain["questions"] == "questions of toy"
    assert "did not write" in domain["outside"] and "truthmap score" in domain["outside"]


def test_a_run_without_a_protocol_is_brief(tmp_path):
    run = make_run(tmp_path / "run")
    card = json.loads((export_detector(run, site="residual", layer=1, position="-1", out=tmp_path / "det") / "card.json").read_text())
    assert card["domain"]["protocol"] == "brief"
