"""Safe weight I/O: safetensors out, safetensors or ``weights_only`` torch files in.

Nothing here unpickles arbitrary objects: ``.pt/.pth/.bin`` files are read with
``torch.load(..., weights_only=True)``, which refuses any custom class or callable.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kd.errors import InputError
from kd.storage import fetch, sha256_file

TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
MLFLOW_SCHEMES = ("runs:/", "models:/")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


WEIGHTS_FILE = "model.safetensors"  # a run's weights, a checkpoint's model, a registered model's data


def _state_dict(obj: nn.Module | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, dict):
        raise TypeError(f"save_weights takes an nn.Module or a state dict, got {type(obj)}")
    return obj


def save_weights(
    model_or_state_dict: nn.Module | dict[str, Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
) -> str:
    """Write the weights to ``path`` as safetensors, atomically; return the file's sha256 hex.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing storage
    (tied weights) are each written as their own copy. Metadata values become strings;
    an empty state dict without metadata gets ``{"format": "pt"}`` so it reads back.
    """
    sd = _state_dict(model_or_state_dict)
    tensors: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a Tensor")
        # clone: no two saved tensors may share memory, and views must own their storage
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if not tensors and not meta:
        meta = {"format": "pt"}  # safetensors cannot read back a header of bare "{}"
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return sha256_file(dest)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty if none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def _download_mlflow(uri: str) -> Path:
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:  # MlflowException, OSError, connection errors
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{uri}: cannot download weights from MLflow ({msg})") from None


def _pick_file(uri: str, folder: Path) -> Path:
    """The weights file inside a downloaded artifact folder."""
    named = sorted(folder.rglob(WEIGHTS_FILE))
    if named:
        return min(named, key=lambda p: len(p.parts))
    found = sorted(folder.rglob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{uri}: folder holds no .safetensors file")
    names = ", ".join(str(p.relative_to(folder)) for p in found[:5])
    raise InputError(f"{uri}: folder holds several .safetensors files ({names}); name one")


_RESOLVERS: dict[str, Callable[[str], Path]] = {}


def register_resolver(prefix: str, fn: Callable[[str], Path]) -> None:
    """Make `resolve` hand URIs starting with ``prefix`` to ``fn`` (a local file or folder).

    The layers above register here (`kd.registry.store.install_resolver` verifies
    ``models:/`` downloads); this module imports nothing above it. `kd.train.driver.fit`
    passes the registered resolvers on to the Ray workers."""
    _RESOLVERS[prefix] = fn


def resolvers() -> dict[str, Callable[[str], Path]]:
    """The resolvers registered so far (prefix -> function)."""
    return dict(_RESOLVERS)


def resolve(uri: str) -> Path:
    """A local file for ``uri``: a path, ``s3://``, ``runs:/`` or ``models:/`` URI. A
    registered resolver (`register_resolver`) takes precedence; without one a
    ``models:/`` URI is downloaded as MLflow gives it, unverified."""
    uri = str(uri)
    fn = next((f for p, f in _RESOLVERS.items() if uri.startswith(p)), None)
    if fn is not None:
        local = fn(uri)
    elif uri.startswith(MLFLOW_SCHEMES):
        local = _download_mlflow(uri)
    else:
        local = fetch(uri)  # local path or s3://; InputError when missing
    if local.is_dir():
        local = _pick_file(uri, local)
    if not local.is_file():
        raise InputError(f"{uri}: no such weights file")
    return local


def _unwrap(uri: str, obj: Any) -> dict[str, Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{uri}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise InputError(f"{uri}: not a state dict of tensors (entry {bad[0]!r} is a "
                         f"{type(obj[bad[0]]).__name__})")
    return obj


def load_state_dict(uri: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a state dict and its metadata from ``uri`` onto the CPU.

    ``uri``: a local path, ``s3://bucket/key``, ``runs:/RUN_ID/path`` or
    ``models:/NAME/VERSION`` / ``models:/NAME@alias``; a folder yields its
    ``model.safetensors`` or its single ``*.safetensors``. ``.safetensors`` keeps its
    header metadata; ``.pt/.pth/.bin/.ckpt`` are loaded with ``weights_only=True`` (a
    bare state dict or one under ``state_dict`` / ``model``) and give empty metadata.
    """
    path = resolve(uri)
    ext = path.suffix.lower()
    if ext == ".safetensors":
        try:
            return load_file(str(path), device="cpu"), read_metadata(path)
        except (SafetensorError, OSError) as e:
            raise InputError(f"{uri}: not a readable safetensors file ({e})") from None
    if ext in TORCH_EXTS:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            m = re.search(r"GLOBAL ([\w.]+)", str(e))
            why = f" (found {m.group(1)})" if m else ""
            raise InputError(
                f"{uri}: refused to load: the file pickles objects other than plain tensors"
                f"{why}; only state dicts load (weights_only). Re-save it as a state dict "
                f"or as safetensors"
            ) from None
        except Exception as e:  # corrupt zip, truncated file, ...
            raise InputError(f"{uri}: cannot read torch file ({type(e).__name__}: {e})") from None
        return _unwrap(uri, obj), {}
    raise InputError(
        f"{uri}: unknown weights format {ext or '(no extension)'!r}; use .safetensors "
        f"or {'/'.join(TORCH_EXTS)}"
    )


def _strip_prefixes(sd: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd) and not all(
                k.startswith(prefix) for k in model_keys
            ):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def load_into(model: nn.Module, state_dict: dict[str, Tensor], what: str) -> None:
    """Load ``state_dict`` into ``model`` strictly.

    A leading ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) on every key is
    stripped. Missing or unexpected keys or shape mismatches raise one `InputError`
    line starting with ``"{what} weights do not fit the architecture"``.
    """
    target = model.state_dict()
    sd = _strip_prefixes(dict(state_dict), set(target))
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    mismatched = [
        k for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (first: {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
            parts.append(
                f"shape mismatch at {k}: checkpoint {tuple(sd[k].shape)} vs model "
                f"{tuple(target[k].shape)}{more}"
            )
        raise InputError(f"{what} weights do not fit the architecture: {', '.join(parts)}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        line = " ".join(str(e).split())
        raise InputError(f"{what} weights do not fit the architecture: {line}") from None


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with no parameter requiring grad; return it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def freeze_paths(model: nn.Module, paths: list[str], field: str) -> int:
    """Stop the gradient of every parameter under each of ``paths`` (a module path such
    as ``bert.embeddings.word_embeddings``, or one parameter's name); the module keeps its
    train/eval mode. Returns the number of frozen elements. A path that names nothing, or
    a list that would freeze every parameter, is an InputError naming ``field[i]``."""
    named = dict(model.named_parameters())
    frozen: set[str] = set()
    for i, path in enumerate(paths):
        hits = [n for n in named if n == path or n.startswith(path + ".")]
        if not hits:
            near = sorted({n.rsplit(".", 1)[0] for n in named})[:8]
            raise InputError(f"{field}[{i}]: {path!r} is no module or parameter of the model "
                             f"(modules with parameters include: {', '.join(near)}, ...)")
        frozen.update(hits)
    if named and len(frozen) == len(named):
        raise InputError(f"{field}: freezes every parameter of the model: nothing would train")
    for n in frozen:
        named[n].requires_grad_(False)
    return sum(named[n].numel() for n in frozen)
