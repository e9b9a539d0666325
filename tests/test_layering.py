"""The house can be checked: imports point down only (ruff TID251 per package, see the
``ruff.toml`` files under kd/), no module over 400 lines, no function over 60."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPWARD = {  # a module of a lower layer -> an import of a layer above it
    "kd/_layering_probe.py": "from kd.train import run",
    "kd/models/_layering_probe.py": "from kd.train.columns import TEACHER_LOGITS",
    "kd/losses/_layering_probe.py": "import kd.registry.store",
    "kd/data/_layering_probe.py": "from kd.tune import sweep",
    "kd/train/_layering_probe.py": "from kd.registry.store import fetch_weights",
    "kd/registry/_layering_probe.py": "from kd.tune.sweep import run_sweep",
    "kd/tune/_layering_probe.py": "from kd import cli",
    "kd/serve/_layering_probe.py": "from kd.cli import run",
}


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
@pytest.mark.parametrize("path", sorted(UPWARD))
def test_upward_import_fails_ruff(path: str, tmp_path: Path) -> None:
    tree = tmp_path / "repo"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "tests", "bench", "docs", "helm", "k8s", "__pycache__", "*.egg-info", ".ruff_cache"))
    (tree / path).write_text(f"{UPWARD[path]}  # noqa: F401\n")
    out = subprocess.run(["ruff", "check", "--no-cache", "--select", "TID251", "."], cwd=tree,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "TID251" in out.stdout and path in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_the_tree_passes_its_layering() -> None:
    out = subprocess.run(["ruff", "check", "--no-cache", "--select", "TID251", "kd"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_room_sizes() -> None:
    too_long = []
    for p in sorted((ROOT / "kd").rglob("*.py")):
        src = p.read_text()
        if len(src.splitlines()) > 400:
            too_long.append(f"{p.relative_to(ROOT)}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    too_long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, "\n".join(too_long)
