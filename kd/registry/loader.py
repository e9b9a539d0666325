"""The pyfunc loader shipped inside every registered kdflow model (MLflow ``loader_module``).

A registered model directory holds ``data/student/model.safetensors`` (the weights),
``data/student/kd_model.json`` (architecture: model name, args, width, num_classes,
input_shape, input dtype, and the weights' sha256) and ``code/kd/`` (this module
plus the model families). ``mlflow.pyfunc.load_model`` puts ``code/`` on
``sys.path``, imports ``kd.registry.loader`` and calls `_load_pyfunc`, which rebuilds
the architecture, checks the sha256 and reads the safetensors file with the
tiny reader below: nothing is unpickled and only torch + numpy are needed.

``predict(x)`` takes a numpy array ``[N, *input_shape]`` (or ``[N, prod(input_shape)]``)
or a DataFrame with one row per sample and returns ``softmax(logits)``,
float32 ``[N, num_classes]``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LOADER_MODULE = "kdflow_model_loader"  # the top-level name this module ships under
WEIGHTS = "model.safetensors"  # = kd.models.weights.WEIGHTS_FILE; this module imports nothing of kdflow
DATA_DIR = "data/student"  # where pyfunc copies the staged folder inside the model
CONFIG = "kd_model.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class ChecksumError(ValueError):
    """The weights file's sha256 is not the one recorded with the model."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes. (The same as `kd.storage.sha256_file`, kept here on
    purpose: this module ships alone inside the model and may import nothing of kdflow's
    storage layer.)"""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file: ``u64 header length | JSON header | raw bytes``.

    A data-only format (no code runs); written here so consumers need no extra package.
    """
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        raw = bytearray(blob[base + start:base + end])
        t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def build_module(data_dir: str | Path, verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The student ``nn.Module`` (eval mode) and its config from a model's ``data`` folder.

    Raises `ChecksumError` when ``verify`` and the weights' sha256 differs from the config's.
    """
    build_model = _families()

    data_dir = Path(data_dir)
    cfg = json.loads((data_dir / CONFIG).read_text())
    weights = data_dir / WEIGHTS
    if verify:
        got = sha256_file(weights)
        if got != cfg["weights_sha256"]:
            raise ChecksumError(f"{weights}: sha256 {got} != recorded {cfg['weights_sha256']}; "
                                "the model's weights were altered or corrupted")
    model = build_model(cfg["model"], cfg["args"], tuple(cfg["input_shape"]),
                        int(cfg["num_classes"]), float(cfg["width"]))
    model.load_state_dict(read_safetensors(weights), strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, cfg


def _families():  # noqa: ANN202
    """``build_model`` of the model families: shipped beside this module inside a model
    (``kdflow_model_loader.models``), else kdflow's own (this module as `kd.registry.loader`)."""
    if __package__ == LOADER_MODULE:
        from .models import build_model
    else:
        from kd.models import build_model
    return build_model


def to_batch(data: Any, input_shape: tuple[int, ...], integer: bool) -> torch.Tensor:
    """A numpy array / DataFrame / list as a batch tensor ``[N, *input_shape]``."""
    if hasattr(data, "to_numpy"):
        data = data.to_numpy()
    arr = np.asarray(data)
    if arr.dtype == object:  # a DataFrame column of per-row arrays
        arr = np.stack([np.asarray(v) for v in arr.reshape(len(arr), -1)[:, 0]])
    arr = arr.reshape((arr.shape[0], *input_shape)) if arr.ndim else arr
    return torch.as_tensor(arr.astype(np.int64 if integer else np.float32))


class StudentModel:
    """What `_load_pyfunc` returns: ``predict`` gives class probabilities; ``module`` is
    the rebuilt ``nn.Module`` (``pyfunc_model.get_raw_model().module``)."""

    def __init__(self, module: nn.Module, cfg: dict[str, Any]) -> None:
        self.module = module
        self.config = cfg
        self.input_shape = tuple(int(s) for s in cfg["input_shape"])
        self.integer = str(cfg.get("input_dtype", "float32")).startswith(("int", "uint"))

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """softmax(module(x)) as float32 ``[N, num_classes]``."""
        x = to_batch(data, self.input_shape, self.integer)
        with torch.no_grad():
            return self.module(x).float().softmax(-1).numpy()


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> StudentModel:
    """MLflow's entry point for ``loader_module``: verify, rebuild, wrap."""
    module, cfg = build_module(data_path)
    return StudentModel(module, cfg)
