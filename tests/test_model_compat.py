"""Models registered by earlier kdflow versions still load.

``tests/fixtures/model_v0`` was saved by kdflow at commit fc95d12 (``loader_module:
kd.registry.loader``, ``code/kd/...``; the pt2 part dropped to keep it small). It is loaded
with ``mlflow.pyfunc.load_model`` in a fresh interpreter, once with kdflow not yet
imported and once after ``import kd`` (the shipped ``code/kd`` must then not matter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FIX = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).parent.parent

SCRIPT = """
import sys, numpy as np
{pre}
import mlflow
m = mlflow.pyfunc.load_model(sys.argv[1])
x = np.load(sys.argv[2]); want = np.load(sys.argv[3])
got = m.predict(x)
assert got.shape == want.shape, got.shape
assert np.allclose(got, want, atol=1e-6), np.abs(got - want).max()
print("OK")
"""


@pytest.mark.parametrize("pre", ["", "import kd, kd.models"])
def test_model_registered_before_loads(pre: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(pre=pre), str(FIX / "model_v0"),
                          str(FIX / "model_v0_input.npy"), str(FIX / "model_v0_expected.npy")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
