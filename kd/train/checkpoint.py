"""Checkpoint I/O: write a checkpoint with its manifest, find a run's checkpoints,
load the newest readable one, prune old ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.errors import InputError, one_line
from kd.integrity import IntegrityError, verify_file
from kd.models.weights import WEIGHTS_FILE, save_weights
from kd.storage import sha256_file
from kd.train.parallel import is_fsdp, state_container, unwrap

CKPT_LOSS = "loss.safetensors"
CKPT_STATE = "train_state.pt"
CKPT_MANIFEST = "manifest.json"


def checkpoint_state(trainee: nn.Module, loss: nn.Module,
                     opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], Any]:
    """(full model state dict on CPU, optimizer state). For FSDP both are gathered
    from the shards with ``torch.distributed.checkpoint.state_dict`` (a collective:
    every rank must call it); for DDP / a plain module they are local copies."""
    if is_fsdp(trainee):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(trainee, options=full),
                get_optimizer_state_dict(state_container(trainee, loss), opt, options=full))
    return {k: v.detach().cpu() for k, v in unwrap(trainee).state_dict().items()}, opt.state_dict()


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota, an I/O error); the message
    names the checkpoint folder and the file. The previous checkpoint is untouched."""


def save_checkpoint(path: Path, model_state: dict[str, torch.Tensor], loss: nn.Module,
                     opt_state: Any, epoch: int, rngs: list[torch.Tensor],
                     extra: dict[str, Any] | None = None) -> None:
    """Write model, loss adapters and train state (plus ``extra``, e.g. the fp16
    GradScaler's state under ``scaler``), then ``manifest.json`` (size and
    sha256 of each file) LAST: a folder without a matching manifest is incomplete.
    The folder is a private temp dir; Ray copies it into storage and registers it
    only after the copy finished, so a half-written checkpoint is never the latest.
    A failed write (e.g. ENOSPC) removes what was written (freeing the space) and raises
    `CheckpointWriteError` naming the folder and file."""
    from safetensors.torch import save_file

    current = path / WEIGHTS_FILE
    try:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(current))
        if any(True for _ in loss.state_dict()):
            current = path / CKPT_LOSS
            save_weights(loss, current)
        current = path / CKPT_STATE
        torch.save({"optimizer": opt_state, "epoch": epoch, "torch_rng": rngs[0],
                    "torch_rng_per_rank": rngs, **(extra or {})}, current)
        files = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)}
                 for f in sorted(path.iterdir()) if f.is_file()}
        current = path / CKPT_MANIFEST
        current.write_text(json.dumps({"epoch": epoch + 1, "files": files}))
    except Exception as e:  # OSError, safetensors' and torch's own wrappers of ENOSPC / EIO
        shutil.rmtree(path, ignore_errors=True)
        raise CheckpointWriteError(
            f"checkpoint of epoch {epoch + 1} not written: {current}: "
            f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]} "
            "(the previous checkpoint is kept)") from None


class IncompleteCheckpoint(ValueError):
    """A checkpoint folder that was never completely written or uploaded (no manifest, or
    a file the manifest lists is absent): e.g. its writer died during the upload."""


def _manifest_files(d: Path, where: str) -> dict[str, dict[str, Any]]:
    """The ``files`` table of ``d/manifest.json``; `InputError` naming it when unreadable."""
    try:
        files = json.loads((d / CKPT_MANIFEST).read_text())["files"]
        if not isinstance(files, dict) or WEIGHTS_FILE not in files:
            raise ValueError("no files table")
        return files
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{where}/{CKPT_MANIFEST}: not a checkpoint manifest "
                         f"({type(e).__name__}); corrupt or truncated") from None


def read_checkpoint(d: Path, where: str | None = None) -> dict[str, Any]:
    """Verify the manifest (every file present, same size and sha256) and load the
    tensors without unpickling code. Errors name the file as ``<where>/<name>`` (where:
    the checkpoint's storage path, default ``d``): `IncompleteCheckpoint` for a folder
    that was never completed, `kd.integrity.IntegrityError` for a file that differs from
    its manifest, `InputError` for an unreadable manifest or a train state that pickles
    anything but tensors and plain containers (refused by ``weights_only``, never run)."""
    from safetensors.torch import load_file

    where = str(where or d).rstrip("/")
    if not (d / CKPT_MANIFEST).exists():
        raise IncompleteCheckpoint(f"{where}: no manifest.json (incomplete checkpoint)")
    for name, meta in _manifest_files(d, where).items():
        f = d / name
        if not f.exists():
            raise IncompleteCheckpoint(f"{where}/{name} missing (incomplete checkpoint)")
        if f.stat().st_size != meta["size"]:
            raise IntegrityError(f"{where}/{name}", f"{meta['size']} bytes",
                                 f"{f.stat().st_size} bytes", "size")
        verify_file(f, meta["sha256"], f"{where}/{name}")
    try:
        state = torch.load(d / CKPT_STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a disallowed global, RuntimeError for a bad zip
        raise InputError(f"{where}/{CKPT_STATE}: refused: not a plain train state "
                         f"({one_line(e)[:200]})") from None
    return {"model": load_file(d / WEIGHTS_FILE),
            "loss": load_file(d / CKPT_LOSS) if (d / CKPT_LOSS).exists() else None,
            "state": state}


def checkpoint_candidates(fs: Any, run_path: str, registered: Any = None) -> list[Any]:
    """Checkpoints of one run, newest first: every ``epoch_*`` folder in the run
    folder, plus the one Ray registered (``ray.train.get_checkpoint()``) if it lies
    elsewhere. The folder listing also finds a checkpoint whose report Ray had not
    yet received when a worker died (the controller polls every ~2 s), so a
    restart never repeats an epoch that was saved."""
    import pyarrow.fs as pafs
    import ray.train

    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("epoch_")), reverse=True)
    out = [ray.train.Checkpoint(f"{run_path}/{n}", filesystem=fs) for n in names]
    if registered is not None and registered.path.rstrip("/") not in {c.path for c in out}:
        out.insert(0, registered)
    return out


def prune_checkpoints(fs: Any, run_path: str, keep: int, final: str) -> list[str]:
    """Delete all but the ``keep`` newest ``epoch_*`` folders of a finished run (never
    ``final``, the checkpoint the run returns). Ray's own ``num_to_keep`` only knows the
    checkpoints whose report reached its controller; one saved just before a worker
    died is found by the folder listing and would otherwise stay. Returns the removed."""
    removed = []
    for ckpt in checkpoint_candidates(fs, run_path)[keep:]:
        if ckpt.path.rstrip("/") != final.rstrip("/"):
            fs.delete_dir(ckpt.path)
            removed.append(ckpt.path)
    return removed


def load_latest_good(candidates: list[Any], verbose: bool) -> dict[str, Any] | None:
    """Load the newest readable checkpoint: one that is corrupt, truncated or
    half-uploaded (its manifest does not match) is skipped, logged, and the
    previous one tried (its ``path`` is in the result). None when there are no
    candidates, or only incomplete ones (a writer killed mid-upload: nothing was
    saved); RuntimeError when a complete one exists but none is readable."""
    errors, damaged = [], False
    for c in candidates:
        try:
            with c.as_directory() as d:
                out = read_checkpoint(Path(d), c.path)
        except Exception as e:
            errors.append(f"{c.path}: {e}")
            damaged = damaged or not isinstance(e, IncompleteCheckpoint)
            if verbose:
                print(f"[kd] checkpoint {c.path} unreadable ({e}); trying the previous one",
                      flush=True)
            continue
        if verbose and errors:
            print(f"[kd] fell back to checkpoint {c.path}", flush=True)
        out["path"] = c.path
        return out
    if damaged:
        raise RuntimeError("no readable checkpoint: " + "; ".join(errors))
    if verbose and errors:
        print("[kd] no complete checkpoint: starting from epoch 1", flush=True)
    return None


def restore_optimizer(opt: torch.optim.Optimizer, state: Any, trainee: nn.Module,
                       loss: nn.Module) -> None:
    if is_fsdp(trainee):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(state_container(trainee, loss), opt, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def run_location(spec: dict[str, Any]) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of this run's folder: the filesystem the driver
    built (``fit`` puts it in the spec, with resolved credentials), else one built
    here from ``run_dir`` (for callers that assemble their own spec)."""
    if spec.get("storage_fs") is not None and spec.get("run_path"):
        return spec["storage_fs"], spec["run_path"]
    from kd import sse, storage

    return storage.arrow_fs(spec["run_dir"], spec["exp"]["storage"].get("endpoint_url"),
                            sse.of(spec["exp"]["storage"]))

