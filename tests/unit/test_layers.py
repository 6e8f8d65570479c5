"""The package's floors and the absence of import cycles (import-linter; the contracts are in
pyproject.toml): a module imports only from its own floor or below (cli > pipeline > analyses > stages >
backends > core), function-local imports included, only the backends import an inference library, and no
modules of a package import each other in a circle. And no module outside the backends touches a model
object (an AST check: import-linter sees imports, not attribute access)."""

import ast
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
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module,line,broken", [
    # a lazy import from the ground floor up into a stage (also a circle: label imports constants)
    ("constants.py", "def _up():\n    from .stages import label\n", "floors"),
    # two analyses (one floor) importing each other, inside functions: only a circle
    ("analyses/attention.py", "def _other():\n    from . import transfer\n", "no cycles"),
    # a stage reaching for transformers itself instead of through its backend
    ("stages/plot.py", "def _model():\n    from transformers import AutoModelForCausalLM\n", "only the backends"),
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


# what only a backend may do with a model: its forward hooks, its modules and its own calls
MODEL_ATTRIBUTES = {"register_forward_hook", "register_forward_pre_hook", "base_model", "get_output_embeddings",
                    "get_input_embeddings", "generation_config", "set_attn_implementation", "head_logits",
                    "hook_site", "site_modules", "blocks", "embeddings"}


def model_touches(source: str) -> list[str]:
    """Where ``source`` touches a model object: ``<x>.model`` of a backend named ``lm`` (``lm.model``,
    ``self.lm.model``), or one of ``MODEL_ATTRIBUTES`` on anything."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        owner_name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
        if (node.attr == "model" and owner_name == "lm") or node.attr in MODEL_ATTRIBUTES:
            found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_no_module_outside_the_backends_touches_a_model_object():
    outside = [p for p in (ROOT / "truthmap").rglob("*.py") if "backends" not in p.relative_to(ROOT / "truthmap").parts]
    touches = {str(p.relative_to(ROOT)): model_touches(p.read_text(encoding="utf-8")) for p in outside}
    assert {path: found for path, found in touches.items() if found} == {}
    # the check finds what it looks for
    assert model_touches("def f(lm):\n    return lm.model.base_model(ids)\n") == ["line 2: .base_model", "line 2: .model"]
    assert model_touches("def f(self):\n    self.lm.embeddings.register_forward_pre_hook(g)\n") == [
        "line 2: .register_forward_pre_hook", "line 2: .embeddings"]
    assert model_touches("def f(lm):\n    return lm.hidden_states(s, i, ['residual'])\n") == []


def test_a_circle_among_the_run_folder_modules_is_found(tmp_path):
    """The run folder's modules build on each other one way (names, text < disk < lock, manifest < atomic
    < files < run < the package's functions): a lazy import from the name catalogue up into run.py closes a
    circle inside truthmap.runfolder, and the contract names that package."""
    pytest.importorskip("importlinter")
    copy = tmp_path / "truthmap"
    shutil.copytree(ROOT / "truthmap", copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "runfolder" / "names.py", "a") as f:
        f.write("\n\ndef _up():\n    from . import run\n")
    result = lint(tmp_path)
    assert result.returncode == 1
    assert "No cycles are allowed in truthmap.runfolder." in result.stdout, result.stdout[-3000:]
