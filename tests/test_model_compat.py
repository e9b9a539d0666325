"""Models registered by earlier kdflow versions still load.

``tests/fixtures/model_v0`` was saved by kdflow at commit fc95d12 (``loader_module:
kd.serving``, ``code/kd/...``; the pt2 part dropped to keep it small). It is loaded
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


SHADOW = """
import sys, numpy as np
import mlflow
m = mlflow.pyfunc.load_model(sys.argv[1])
x = np.load(sys.argv[2]); want = np.load(sys.argv[3])
assert np.allclose(m.predict(x), want, atol=1e-6)
import kd, kd.train
assert kd.__file__.startswith(sys.argv[4]), kd.__file__  # the real kdflow, not a copy in code/
print("OK")
"""


def test_new_model_ships_no_kd_package(tmp_path: Path) -> None:
    """A model saved now ships ``code/kdflow_model_loader`` (never ``code/kd``), loads in
    a fresh interpreter, and ``import kd`` afterwards is still the installed kdflow."""
    import json

    import numpy as np
    import torch
    from mlflow.models import Model

    from kd.models import build_model
    from kd.models.weights import read_metadata, save_weights
    from kd.registry import register as R
    from kd.registry.loader import CONFIG, LOADER_MODULE, WEIGHTS

    torch.manual_seed(0)
    m = build_model("mlp", {"hidden": [8]}, (64,), 10, 1.0)
    data = tmp_path / "student"
    data.mkdir()
    meta = {"kd.model": "mlp", "kd.args": json.dumps({"hidden": [8]}), "kd.width": "1.0",
            "kd.num_classes": "10", "kd.input_shape": "[64]", "kd.input_dtype": "float32"}
    sha = save_weights(m, data / WEIGHTS, meta)
    (data / CONFIG).write_text(json.dumps(R.arch_config(read_metadata(data / WEIGHTS), sha)))
    code = R.stage_code(tmp_path / "code")
    x = np.random.default_rng(1).random((3, 64)).astype(np.float32)
    out = tmp_path / "model"
    R._save_flavors(str(out), Model(), str(data), str(code), "# card\n", str(tmp_path / "none"),
                    program=R.export_program(m.eval(), x, text=False)[0], **R.classify_inputs(x, 10))
    assert (out / "code" / LOADER_MODULE / "__init__.py").is_file()
    assert not (out / "code" / "kd").exists()
    assert f"loader_module: {LOADER_MODULE}" in (out / "MLmodel").read_text()
    want = m.eval()(torch.as_tensor(x)).softmax(-1).detach().numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", want)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", SHADOW, str(out), str(tmp_path / "x.npy"),
                          str(tmp_path / "want.npy"), str(ROOT / "kd")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
