"""Imports run one way: the import-linter contracts of pyproject.toml ([tool.importlinter]) hold,
and they would catch an upward import or a circle (checked on a copy of the sources with one
bad import added)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def lint_imports(cwd: Path, config: Path, src: Path | None = None) -> subprocess.CompletedProcess:
    """`lint-imports` on `config`; `src` first on the path (a copy of t2ilab to check)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    # the console script beside this interpreter; --no-cache: nothing written into the checkout
    cmd = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"]
    if not Path(cmd[0]).exists():  # an interpreter without the script beside it
        cmd[:1] = [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command as m; m()",
        ]
    return subprocess.run(
        [*cmd, str(config)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_import_contracts_hold():
    result = lint_imports(ROOT, PYPROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


# (module to add an import to, the import, the contract it breaks)
BAD_IMPORTS = {
    "upward": (
        "t2ilab/utils/images.py",
        "from t2ilab.models import loading  # noqa",
        "t2ilab layers",
    ),
    "circle": (
        "t2ilab/models/sources.py",
        "def f():\n    from t2ilab.models import loading  # noqa",
        "No import cycles",
    ),
    "analysis imports training": (
        "t2ilab/analysis/plots.py",
        "def f():\n    from t2ilab.runner import run_task  # noqa",
        "Analysis does not import training",
    ),
    "analysis imports lightning": (
        "t2ilab/analysis/collect.py",
        "def f():\n    import lightning  # noqa",
        "Analysis does not import training",
    ),
}


@pytest.mark.parametrize("case", BAD_IMPORTS)
def test_the_contracts_catch_a_bad_import(case, tmp_path):
    module, line, contract = BAD_IMPORTS[case]
    src = tmp_path / "src"
    shutil.copytree(
        ROOT / "src" / "t2ilab",
        src / "t2ilab",
        ignore=shutil.ignore_patterns("__pycache__", "assets"),
    )
    with open(src / module, "a") as f:
        f.write(f"\n\n{line}\n")
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")

    result = lint_imports(tmp_path, tmp_path / "pyproject.toml", src)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert any(ln.startswith(contract) and " BROKEN" in ln for ln in out.splitlines()), out
    assert module.removesuffix(".py").replace("/", ".").rsplit(".", 1)[-1] in out, out
