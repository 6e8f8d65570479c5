"""The package's floors and the absence of import cycles (import-linter; the contracts are in
pyproject.toml): a module imports only from its own floor or below (cli > pipeline > analyses > stages >
model code > core), function-local imports included, and no modules of a package import each other in a
circle."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                           f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_floors_and_has_no_import_cycle():
    pytest.importorskip("importlinter")
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module,line,broken", [
    # a lazy import from the ground floor up into a stage (also a circle: label imports constants)
    ("constants.py", "def _up():\n    from .stages import label\n", "floors"),
    # two analyses (one floor) importing each other, inside functions: only a circle
    ("analyses/attention.py", "def _other():\n    from . import transfer\n", "no cycles"),
])
def test_an_import_against_the_contracts_is_found(tmp_path, module, line, broken):
    pytest.importorskip("importlinter")
    copy = tmp_path / "truthmap"
    shutil.copytree(ROOT / "truthmap", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as f:
        f.write("\n\n" + line)
    if broken == "no cycles":
        with open(copy / "analyses/transfer.py", "a") as f:
            f.write("\n\ndef _back():\n    from . import attention\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    found = [line for line in result.stdout.splitlines() if " BROKEN" in line]
    assert any(line.startswith(broken) for line in found), result.stdout[-3000:]
    if broken == "no cycles":
        assert not any(line.startswith("floors") for line in found)
