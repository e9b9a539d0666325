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

A text embedding model (``"task": "embed"`` in ``kd_model.json``) also ships
``data/student/tokenizer.json``; its ``predict`` takes texts (a list or numpy array of
strings, a DataFrame with a ``text`` column or a single column) and returns the
embeddings, float32 ``[N, D]`` (no softmax). Texts are tokenized like training (the
shipped ``models/tokens.py``: special tokens, cut to ``max_length``, right-padded with
the pad id); tokenizing needs the ``tokenizers`` package, imported only then.

Precision (`PRECISIONS`): ``fp32`` (the default: the weights as trained) or ``bf16``: the
weights are cast to bfloat16 and every forward runs under bf16 autocast; outputs are
float32 either way. ``mlflow.pyfunc.load_model(uri, model_config={"precision": "bf16"})``,
``kd predict --precision bf16`` and ``kd serve --precision bf16`` choose it. Measured on a
CPU with avx512_bf16 (bench/precision.py): 1.7-2.3x the rows/s of fp32 for MiniLM-sized
encoders and resnet20, embeddings within 1e-4 of fp32's cosine; on a CPU without native
bf16 it is slower than fp32, and the first forward says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import platform
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LOADER_MODULE = "kdflow_model_loader"  # the top-level name this module ships under
WEIGHTS = "model.safetensors"  # = kd.models.weights.WEIGHTS_FILE; this module imports nothing of kdflow
DATA_DIR = "data/student"  # where pyfunc copies the staged folder inside the model
CONFIG = "kd_model.json"
TOKENIZER = "tokenizer.json"  # = kd.models.tokens.TOKENIZER_FILE, beside the weights of a text model
PREDICT_BATCH = 256  # texts per forward in predict
PRECISIONS = ("fp32", "bf16")  # inference precision (module docstring)
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


def _tokens():  # noqa: ANN202
    """``kd.models.tokens`` (fixed-length encoding as in training): shipped beside this
    module inside a model, else kdflow's own."""
    if __package__ == LOADER_MODULE:
        from .models import tokens
    else:
        from kd.models import tokens
    return tokens


def load_text_tokenizer(data_dir: str | Path, cfg: dict[str, Any], verify: bool = True) -> Any:
    """The `TextTokenizer` of an embed model's ``data`` folder (``tokenizer.json``).

    Raises `ChecksumError` when ``verify`` and the file's sha256 is not the recorded
    ``text.tokenizer_sha256``, or its fingerprint (the vocabulary and normaliser) is not
    the recorded ``text.fingerprint``: it would map texts to other ids than training did."""
    path = Path(data_dir) / TOKENIZER
    text = cfg["text"]
    if verify and text.get("tokenizer_sha256") and sha256_file(path) != text["tokenizer_sha256"]:
        raise ChecksumError(f"{path}: sha256 differs from the recorded tokenizer_sha256; the "
                            "model's tokenizer was altered or corrupted")
    tok = _tokens().load_tokenizer(str(path))
    if verify and text.get("fingerprint") and tok.fingerprint != text["fingerprint"]:
        raise ChecksumError(f"{path}: tokenizer fingerprint {tok.fingerprint} != recorded "
                            f"{text['fingerprint']} (it maps text to other ids than training)")
    return tok


def to_texts(data: Any) -> list[str]:
    """Texts of a list / numpy array of strings, a pandas Series, or a DataFrame with a
    ``text`` column (or a single column); a lone string is one text. An empty (blank)
    text or a non-string is a `ValueError` of one line naming the row."""
    if isinstance(data, str):
        data = [data]
    if hasattr(data, "columns"):  # a DataFrame
        cols = [str(c) for c in data.columns]
        if "text" in cols:
            data = data["text"]
        elif len(cols) == 1:
            data = data[data.columns[0]]
        else:
            raise ValueError(f"predict: a DataFrame of texts needs a 'text' column or a single "
                             f"column, got columns {cols[:8]}")
    if hasattr(data, "to_numpy"):
        data = data.to_numpy()
    arr = np.asarray(data, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"predict: expected a 1-D list of texts, got shape {arr.shape}")
    for i, v in enumerate(arr):
        if not isinstance(v, str):
            raise ValueError(f"predict: row {i} is a {type(v).__name__}, not a string (an "
                             "embedding model takes texts)")
        if not v.strip():
            raise ValueError(f"predict: row {i} is an empty text; every row needs non-blank text")
    return [str(v) for v in arr]


def embed_texts(forward: Callable[[torch.Tensor], torch.Tensor], tokenizer: Any,
                texts: list[str], max_length: int, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """float32 ``[N, D]``: ``forward(ids)`` for ``ids = tokenizer.encode(texts, max_length)``
    (cut to ``max_length`` like training), row i for text i. ``forward`` takes CPU token
    ids and returns the embeddings (`StudentModel.forward`: the module's device and
    precision). The rows are forwarded longest first, ``batch_size`` at a time, each batch
    cut after its last non-pad column: texts of similar length share a batch, so little is
    padding (exact: the models mask tokens by the pad id)."""
    if not texts:
        raise ValueError("predict: no texts given")
    ids, _ = tokenizer.encode(texts, max_length)
    order = np.argsort(-(ids != tokenizer.pad_id).sum(1), kind="stable")
    out: np.ndarray | None = None
    for i in range(0, len(texts), batch_size):
        rows = order[i:i + batch_size]
        chunk = ids[rows]
        real = (chunk != tokenizer.pad_id).any(0).nonzero()[0]
        chunk = chunk[:, :int(real.max()) + 1 if len(real) else 1]
        emb = forward(torch.as_tensor(chunk)).cpu().numpy()
        if out is None:
            out = np.empty((len(texts), emb.shape[1]), np.float32)
        out[rows] = emb
    return out


def to_batch(data: Any, input_shape: tuple[int, ...], integer: bool) -> torch.Tensor:
    """A numpy array / DataFrame / list as a batch tensor ``[N, *input_shape]``."""
    if hasattr(data, "to_numpy"):
        data = data.to_numpy()
    arr = np.asarray(data)
    if arr.dtype == object:  # a DataFrame column of per-row arrays
        arr = np.stack([np.asarray(v) for v in arr.reshape(len(arr), -1)[:, 0]])
    arr = arr.reshape((arr.shape[0], *input_shape)) if arr.ndim else arr
    return torch.as_tensor(arr.astype(np.int64 if integer else np.float32))


def check_precision(precision: str) -> str:
    """``precision`` if it is one of `PRECISIONS`, else a one-line `ValueError`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def native_bf16(device: torch.device) -> bool | None:
    """Whether ``device`` computes bf16 natively: a CUDA device that supports it, or a CPU
    whose ``/proc/cpuinfo`` flags list avx512_bf16 / amx_bf16 (x86) or bf16 (arm64);
    None when it cannot be told (no ``/proc/cpuinfo``)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = {w for line in info.splitlines()
             if line.lower().startswith(("flags", "features")) for w in line.split(":", 1)[-1].split()}
    wanted = {"bf16"} if platform.machine().lower() in ("aarch64", "arm64") else {"avx512_bf16",
                                                                                 "amx_bf16"}
    return bool(flags & wanted)


class StudentModel:
    """What `_load_pyfunc` returns: ``predict`` gives class probabilities (an embed
    model: embeddings of texts); ``module`` is the rebuilt ``nn.Module``
    (``pyfunc_model.get_raw_model().module``); ``tokenizer`` the `TextTokenizer` of an
    embed model (None otherwise); ``precision`` one of `PRECISIONS` (bf16: the module's
    weights are cast to bfloat16 in place, so pass a module of its own, and `forward` runs
    under bf16 autocast)."""

    def __init__(self, module: nn.Module, cfg: dict[str, Any], tokenizer: Any = None,
                 precision: str = "fp32") -> None:
        self.precision = check_precision(precision)
        self.module = module.to(torch.bfloat16) if precision == "bf16" else module
        self.config = cfg
        self.task = str(cfg.get("task", "classify"))
        self.tokenizer = tokenizer
        self.input_shape = tuple(int(s) for s in cfg["input_shape"])
        self.integer = str(cfg.get("input_dtype", "float32")).startswith(("int", "uint"))
        self._checked = precision != "bf16"  # bf16: the first forward checks the device

    def get_raw_model(self) -> StudentModel:
        """This object (what ``pyfunc_model.get_raw_model()`` returns)."""
        return self

    def to(self, device: str | torch.device) -> StudentModel:
        """Move the module to ``device`` (a GPU actor); returns self."""
        self.module.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` as float32 on the module's device: ``x`` moved there first, no
        grad, under bf16 autocast when ``precision`` is bf16 (the first such forward on a
        CPU without native bf16, `native_bf16`, says in one line on stderr that it will be
        slower than fp32)."""
        device = next(self.module.parameters()).device
        if not self._checked:
            self._checked = True
            if native_bf16(device) is False:
                print(f"[kd] precision bf16: this {device.type} has no native bf16 "
                      "(avx512_bf16 / amx_bf16 / bf16); expect it slower than fp32",
                      file=sys.stderr, flush=True)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=self.precision == "bf16"):
            return self.module(x.to(device)).float()

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """softmax(module(x)) as float32 ``[N, num_classes]``; an embed model:
        ``module(encode(texts))`` as float32 ``[N, D]`` (see `to_texts`, `embed_texts`)."""
        if self.task == "embed":
            if self.tokenizer is None:
                raise ValueError("predict: this embedding model was loaded without its "
                                 "tokenizer; load it with load_student(data_dir)")
            texts = to_texts(data)
            return embed_texts(self.forward, self.tokenizer, texts,
                               int(self.config["text"]["max_length"]))
        x = to_batch(data, self.input_shape, self.integer)
        return self.forward(x).softmax(-1).cpu().numpy()


def load_student(data_dir: str | Path, verify: bool = True,
                 precision: str = "fp32") -> StudentModel:
    """`build_module` wrapped for prediction in ``precision`` (`PRECISIONS`), with the
    tokenizer of an embed model."""
    check_precision(precision)
    module, cfg = build_module(data_dir, verify)
    tok = load_text_tokenizer(data_dir, cfg, verify) if cfg.get("task") == "embed" else None
    return StudentModel(module, cfg, tok, precision)


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> StudentModel:
    """MLflow's entry point for ``loader_module``: verify, rebuild, wrap. ``model_config``
    (``mlflow.pyfunc.load_model(uri, model_config=...)``) may set ``precision``."""
    return load_student(data_path, precision=str((model_config or {}).get("precision", "fp32")))
