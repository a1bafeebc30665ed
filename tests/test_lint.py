"""The repository passes ``ruff check`` under pyproject.toml's ``[tool.ruff]``, and each package of
batchkin (engine/, kernels/, plugins/) imports its own modules relatively."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folder -> the import name it installs as, and its sub-packages that are other folders
PACKAGES = {"engine": ("batchkin", ("batchkin.plugins", "batchkin.kernels", "batchkin.csrc")),
            "kernels": ("batchkin.kernels", ()), "plugins": ("batchkin.plugins", ())}


def test_ruff_check_passes():
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


def own_absolute_imports(path: Path, own: str, others: tuple[str, ...]) -> list[str]:
    """``file:line module`` of each import of ``own`` (or a module under it) by its absolute name."""
    def is_own(name: str) -> bool:
        inside = name == own or name.startswith(own + ".")
        return inside and not any(name == o or name.startswith(o + ".") for o in others)

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and is_own(node.module or ""):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.module}")
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(ROOT)}:{node.lineno} {a.name}" for a in node.names if is_own(a.name)]
    return found


@pytest.mark.parametrize("folder", sorted(PACKAGES))
def test_each_package_imports_its_own_modules_relatively(folder):
    own, others = PACKAGES[folder]
    found = [hit for path in sorted((ROOT / folder).rglob("*.py")) for hit in own_absolute_imports(path, own, others)]
    assert not found, "import these relatively (from .module import ...):\n" + "\n".join(found)


def test_the_import_check_sees_absolute_and_relative_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    module = tmp_path / "m.py"
    module.write_text('"""from batchkin.errors import ConfigError (a docstring, not an import)"""\n'
                      "from .errors import ConfigError\nfrom batchkin.kernels import rng\n"
                      "import batchkin.data\nfrom batchkin import faults\n")
    assert own_absolute_imports(module, "batchkin", ("batchkin.kernels",)) == ["m.py:4 batchkin.data",
                                                                               "m.py:5 batchkin"]
    assert own_absolute_imports(module, "batchkin.kernels", ()) == ["m.py:3 batchkin.kernels"]
