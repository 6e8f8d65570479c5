"""The figure helper every plot goes through: grey for missing cells, layer ticks, atomic PNG/SVG writes."""

import json

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from truthmap import runfolder as rf
from truthmap.errors import TruthmapError
from truthmap.figures import MISSING, draw_grid, new_figure, png_and_svg, save
from truthmap.stages.baselines import control_level
from truthmap.stages.plot import plot_heatmap


def test_missing_cells_are_grey_and_rows_are_layer_numbers():
    fig, ax = new_figure()
    values = np.array([[0.6, np.nan], [0.9, 0.7]] * 20)  # 40 layers
    image = draw_grid(ax, values, cmap="Blues", vmin=0.5, vmax=1.0, columns=["a", "b"], layers=list(range(40)))
    assert image.cmap.get_bad() == pytest.approx(to_rgba(MISSING))
    assert np.ma.getmaskarray(image.get_array())[0, 1] and not np.ma.getmaskarray(image.get_array())[0, 0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [str(k) for k in range(0, 40, 2)]  # every second layer of 40
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    plt.close(fig)
    fig, ax = new_figure()
    draw_grid(ax, values[:3], cmap="Blues", vmin=0.5, vmax=1.0, columns=["a", "b"], rows=["x", "y", "z"])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]
    plt.close(fig)


def test_the_heatmap_writes_png_and_svg_through_the_manifest(tmp_path):
    run = tmp_path / "run"
    results = pd.DataFrame([{"site": "residual", "layer": layer, "position": position, "seed": seed,
                             "auc": 0.6 + 0.01 * layer, "val_auc": 0.6, "auc_within": np.nan}
                            for layer in range(3) for position in ("-1", "last_q") for seed in (0, 1)])
    with rf.open_run(run):
        paths = plot_heatmap(results, ["-1", "last_q"], run / "heatmap", model="m", dataset="d", n=10)
    assert paths == list(png_and_svg(run / "heatmap"))
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in paths[1].read_bytes()[:2000]
    files = json.loads((run / rf.MANIFEST).read_text())["files"]
    for path in paths:  # listed with the checksum of what is on disk
        assert files[path.name]["size"] == path.stat().st_size
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert plt.get_fignums() == []


def test_a_failed_write_leaves_no_file_and_no_open_figure(tmp_path):
    (tmp_path / "blocked").write_text("a file where a folder should be")
    fig, _ = new_figure()
    with pytest.raises(TruthmapError, match="not a folder"):
        save(fig, tmp_path / "blocked" / "figure.png")
    assert not plt.fignum_exists(fig.number)


# ---------------------------------------------------------------- the heatmap's reading aids, and the paper figure

def auc_rows(aucs: dict, seeds=(0, 1), baselines: dict | None = None) -> pd.DataFrame:
    """probe_results rows of given mean AUCs {(layer, position): auc} (val AUC = test AUC, a 0.02 interval),
    and baseline rows {name: (auc, low, high)}."""
    rows = [{"site": "residual", "layer": layer, "position": position, "seed": seed, "auc": auc, "val_auc": auc,
             "val_auc_se": 0.0, "mean_auc_lo": auc - 0.02, "mean_auc_hi": auc + 0.02, "n_test": 40}
            for (layer, position), auc in aucs.items() for seed in seeds]
    rows += [{"site": "baseline", "layer": -1, "position": name, "seed": seed, "auc": auc, "mean_auc_lo": low,
              "mean_auc_hi": high, "n_test": 40} for name, (auc, low, high) in (baselines or {}).items() for seed in seeds]
    return pd.DataFrame(rows)


GRID = {(layer, position): auc for layer, row in enumerate([[0.40, 0.55], [0.62, 0.71], [0.70, 0.90]])
        for position, auc in zip(["last_q", "exact_answer_first"], row)}


def hatched_cells(ax) -> set:
    return {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches if p.get_hatch()}


def test_the_heatmap_hatches_the_cells_that_do_not_beat_the_controls_and_names_the_chosen_cell(tmp_path, monkeypatch):
    from truthmap.figures import AUC_CMAP, auc_norm
    from truthmap.stages import plot

    drawn = {}
    monkeypatch.setattr(plot, "save", lambda fig, *paths: drawn.update(fig=fig) or list(paths))
    # the controls' highest upper bound is surface's 0.70 (family_rate: higher AUC, narrower interval)
    results = auc_rows(GRID, baselines={"surface": (0.64, 0.58, 0.70), "family_rate": (0.66, 0.65, 0.67),
                                        "logprob_mean": (0.80, 0.75, 0.85)})  # not a control: sets no bar
    assert control_level(results) == {"name": "surface", "auc": 0.64, "high": 0.70}
    left_out = plot.left_out_note({"q1": "no_exact_answer:no_match", "q2": "no_exact_answer:no_match", "q3": "-8",
                                   "q4": "-8", "q5": "refusal"})
    plot.plot_heatmap(results, ["last_q", "exact_answer_first"], tmp_path / "heatmap", model="m", dataset="d", n=40,
                      left_out=left_out)
    ax = drawn["fig"].axes[0]
    assert hatched_cells(ax) == {(0, 0), (0, 1), (1, 0), (2, 0)}  # AUC ≤ 0.70; 0.71 and 0.90 beat them
    title = ax.get_title()
    assert "layer 2, exact answer, first token: test AUC 0.900 (0.88–0.92)" in title and "0.70" in title
    assert "n=40 answers; 5 left out (no_exact_answer:no_match 2, -8 2, …)" in title
    assert [t.get_text() for t in ax.get_xticklabels()] == ["last question token", "exact answer, first token"]
    # below chance is coloured (red), not white like chance
    cmap, norm = matplotlib.colormaps[AUC_CMAP], auc_norm()
    red, green, blue, _ = cmap(norm(0.40))
    assert red > 0.6 and blue < 0.5
    assert np.allclose(cmap(norm(0.5))[:3], cmap(0.5)[:3]) and min(cmap(norm(0.5))[:3]) > 0.9  # chance: near white
    plt.close(drawn["fig"])


def test_no_control_rows_no_hatching_and_the_within_view_is_never_hatched(tmp_path, monkeypatch):
    from truthmap.stages import plot

    drawn = []
    monkeypatch.setattr(plot, "save", lambda fig, *paths: drawn.append(fig) or list(paths))
    plot.plot_heatmap(auc_rows(GRID), ["last_q", "exact_answer_first"], tmp_path / "h", model="m", dataset="d", n=40)
    with_controls = auc_rows(GRID, baselines={"surface": (0.8, 0.75, 0.95)}).assign(within_auc=0.6, within_val_auc=0.6)
    plot.plot_heatmap(with_controls, ["last_q", "exact_answer_first"], tmp_path / "w", model="m", dataset="d", n=40,
                      view="heatmap_within")
    assert [hatched_cells(fig.axes[0]) for fig in drawn] == [set(), set()]
    plt.close("all")


def test_position_labels_read_as_words():
    from truthmap.figures import position_label

    assert [position_label(p) for p in ("last_q", "exact_answer_last", "-1", "-2", "-3", "-8", "-11", "-21", "x")] == [
        "last question token", "exact answer, last token", "last token", "2nd last token", "3rd last token",
        "8th last token", "11th last token", "21st last token", "x"]


def test_baselines_png_has_a_legend_and_no_empty_bar_for_a_baseline_without_auc(tmp_path, monkeypatch):
    from truthmap.stages import baselines

    drawn = {}
    monkeypatch.setattr("truthmap.figures.save", lambda fig, *paths: drawn.update(fig=fig) or list(paths))
    results = auc_rows(GRID, baselines={"surface": (0.6, 0.55, 0.65), "logprob_mean": (0.7, 0.65, 0.75),
                                        "family_rate": (np.nan, np.nan, np.nan)})  # one family: no AUC
    cell = {"site": "residual", "layer": 2, "position": "exact_answer_first", "auc": 0.9, "auc_lo": 0.88, "auc_hi": 0.92}
    baselines.plot_baselines(results, cell, float("nan"), tmp_path / "baselines.png", "title")
    ax = drawn["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["surface", "logprob_mean", "probe residual L2 exact_answer_first"]  # no family_rate bar
    assert "family_rate" in ax.get_title()  # said instead
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["probe (chosen cell)", "control", "baseline", "controls' bar (0.65)"]
    plt.close(drawn["fig"])


@pytest.fixture
def figure_run(tmp_path):
    """A run folder (tests/unit/test_report.py's) with controls, a baseline and a verdict whose chosen cell is
    not the validation-best one (so that the figure is seen to follow the verdict)."""
    from _synthetic import seal
    from test_report import make_run

    run = make_run(tmp_path / "run")
    auc_rows({}, baselines={"surface": (0.6, 0.55, 0.65), "logprob_mean": (0.7, 0.66, 0.74)}).to_csv(
        run / "baseline_results.csv", index=False)
    summary = json.loads((run / "summary.json").read_text())
    summary["verdict"] = {"line": "the exact-answer tokens beat the last tokens by +0.06 (−0.02 … +0.14): not shown",
                          "chosen": {"site": "residual", "layer": 1, "position": "-1", "auc": 0.777, "low": 0.701,
                                     "high": 0.843, "seed_sd": 0.01},
                          "comparisons": [], "beats_controls": True, "n_test": 20, "n_test_groups": 20}
    (run / "summary.json").write_text(json.dumps(summary))
    return seal(run)


def test_the_paper_figure_follows_the_verdict_with_controls_baselines_and_a_legend(figure_run, tmp_path, monkeypatch):
    from truthmap.stages import plot

    drawn = {}
    monkeypatch.setattr(plot, "save", lambda fig, *paths: drawn.update(fig=fig) or list(paths))
    with rf.reading(figure_run):
        plot.paper_figure(figure_run, tmp_path / "f.pdf", width=6, height=3.5, font_size=9)
    fig = drawn["fig"]
    heat, bars = fig.axes[0], fig.axes[1]
    assert "layer 1, last token — test AUC 0.777 (0.70–0.84)" in fig._suptitle.get_text()
    caption = fig._supxlabel.get_text()
    assert caption.startswith("the exact-answer tokens beat the last tokens") and "0.65" in caption
    assert fig.get_size_inches() == pytest.approx([6, 3.5])
    assert [t.get_text() for t in heat.get_xticklabels()] == ["last question token", "exact answer, last token", "last token"]
    results = pd.read_csv(figure_run / "probe_results.csv")
    means = results.groupby(["layer", "position"]).auc.mean()
    layers, positions = [0, 1, 2], ["last_q", "exact_answer_last", "-1"]
    assert hatched_cells(heat) == {(layers.index(l), positions.index(p)) for (l, p), auc in means.items() if auc <= 0.65}
    assert [t.get_text() for t in bars.get_yticklabels()] == ["surface", "logprob mean", "probe L1 last token"]
    assert [t.get_text() for t in bars.get_legend().get_texts()] == ["probe (chosen cell)", "control", "baseline",
                                                                     "controls' bar (0.65)"]
    plt.close(fig)


def test_figure_command_writes_each_format_and_never_replaces_a_file_unasked(figure_run, tmp_path, capsys, monkeypatch):
    from truthmap.cli import app

    monkeypatch.chdir(tmp_path)
    heads = {"pdf": b"%PDF", "png": b"\x89PNG", "svg": b"<?xml"}
    for fmt, head in heads.items():
        app(["figure", str(figure_run), "--format", fmt, "--width", "5", "--font-size", "7"])
        assert (tmp_path / f"run-figure.{fmt}").read_bytes()[:len(head)] == head
    app(["figure", str(figure_run), "--out", str(tmp_path / "mine.svg")])  # the format from the suffix
    assert b"<svg" in (tmp_path / "mine.svg").read_bytes()[:3000]
    (tmp_path / "notes.pdf").write_bytes(b"the user's own file")
    for args, says in ((["--out", "notes.pdf"], "did not write it"),
                       (["--out", "x.pdf", "--format", "png"], "--format says png"),
                       (["--out", "x.jpg"], "must end in .pdf, .svg or .png")):
        with pytest.raises(SystemExit) as exit_:
            app(["figure", str(figure_run), *args])
        assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert (tmp_path / "notes.pdf").read_bytes() == b"the user's own file" and not (tmp_path / "x.pdf").exists()
    (tmp_path / "link.pdf").symlink_to(tmp_path / "notes.pdf")
    with pytest.raises(SystemExit):
        app(["figure", str(figure_run), "--out", "link.pdf", "--overwrite"])
    assert "symbolic link" in capsys.readouterr().err and (tmp_path / "notes.pdf").read_bytes() == b"the user's own file"
    app(["figure", str(figure_run), "--out", "notes.pdf", "--overwrite"])
    assert (tmp_path / "notes.pdf").read_bytes()[:4] == b"%PDF"
