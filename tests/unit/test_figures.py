"""The figure helper every plot goes through: grey for missing cells, layer ticks, atomic PNG/SVG writes."""

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

from truthmap import runfolder as rf
from truthmap.figures import MISSING, draw_grid, new_figure, png_and_svg, save
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
    with pytest.raises(OSError):
        save(fig, tmp_path / "blocked" / "figure.png")
    assert not plt.fignum_exists(fig.number)
