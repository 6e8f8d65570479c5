"""bench/gpu.py's code path, on the CPU with tiny shapes (``--tiny``): the device check that a GPU session
runs must not be the first to find that it breaks."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.arch


def test_the_gpu_check_runs_its_steps_and_its_checks_pass(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("truthmap_gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    status = bench.main(["--tiny", "--examples", "24", "--batch", "8", "--models", "llama,qwen"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("equality checks passed") == 2
    assert out.count("24/24 answers identical") == 2  # the capture changes no answer
    for line in ("generation alone", "generation with one-pass capture", "separate extraction pass",
                 "truthmap probes: 12 cells × 3 seeds, N = 24", "scikit-learn, the same cell"):
        assert line in out
    assert out.rstrip().endswith("all checks passed")
