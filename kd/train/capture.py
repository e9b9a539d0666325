"""Capture the outputs of named submodules with forward hooks.

Paths are ``named_modules()`` names (``layer3.1.conv2``). A model wrapped in DDP /
FSDP / ``torch.compile`` is addressed by its inner names: wrapper segments
(``module.``, ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``,
``_orig_mod.``) need not be written.

A path may end in ``#k`` (``k`` a non-negative integer): the module is the one named
without the suffix, and the stored tensor is element ``k`` of its tuple/list output
(``bert.encoder.layer.0.attention.self#1``: the attention probabilities ``[B, H, L, L]``
of a transformers BERT layer run with eager attention).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kd.errors import InputError

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_ELEMENT = re.compile(r"^(.+)#(\d+)$")
EAGER_HINT = "attention probabilities need eager attention: set the model's args attn: eager"


def split_path(path: str) -> tuple[str, int | None]:
    """``"mod.path#k"`` -> ``("mod.path", k)``; a path without ``#`` -> ``(path, None)``.

    A ``#`` not followed by a non-negative integer is an `InputError`.
    """
    if "#" not in path:
        return path, None
    match = _ELEMENT.match(path)
    if match is None:
        raise InputError(f"feature path {path!r}: what follows '#' must be an element index "
                         f"(0, 1, ...) of the module's tuple output")
    return match.group(1), int(match.group(2))


def _clean(name: str) -> str:
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def module_names(model: nn.Module) -> list[str]:
    """The addressable submodule paths of ``model`` (wrapper segments removed)."""
    seen: dict[str, None] = {}
    for name, _ in model.named_modules():
        clean = _clean(name)
        if clean:
            seen[clean] = None
    return list(seen)


def resolve(model: nn.Module, path: str, role: str = "student") -> nn.Module:
    """The submodule of ``model`` at ``path`` (a ``#k`` suffix ignored), looking through
    DDP/FSDP wrappers.

    An unknown path raises `InputError` naming the nearest existing paths.
    """
    written, path = path, split_path(path)[0]
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module):
        try:
            return inner.get_submodule(path)
        except AttributeError:
            pass
    target = _clean(path)
    for name, module in model.named_modules():
        if name and _clean(name) == target:
            return module
    names = module_names(model)
    near = difflib.get_close_matches(path, names, n=3, cutoff=0.0)
    raise InputError(
        f"feature path {written!r} not found in {role} model; nearest: {', '.join(near) or '(none)'}"
    )


def check_paths(model: nn.Module, paths: Iterable[str], role: str = "student") -> None:
    """Raise `InputError` for the first path in ``paths`` that ``model`` lacks."""
    for path in paths:
        resolve(model, path, role)


def _first_tensor(out: Any) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(out, dict):
        for item in out.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _element(output: Any, index: int, path: str) -> Tensor | None:
    """Element ``index`` of a tuple/list ``output`` (its first tensor when the element is
    a container); None when the element is None. No such element is an `InputError`."""
    if not isinstance(output, (tuple, list)) or index >= len(output):
        what = f"a {type(output).__name__}" if not isinstance(output, (tuple, list)) else (
            f"{len(output)} elements")
        raise InputError(f"feature path {path!r}: the module's output has no element {index} "
                         f"(it returned {what})")
    item = output[index]
    return item if item is None or isinstance(item, Tensor) else _first_tensor(item)


class FeatureCapture:
    """Forward hooks storing each path's latest output in ``.features[path]``.

    For tuple/list/dict outputs the first tensor is kept, or element ``k`` for a path
    ending in ``#k`` (no such element: `InputError`; the element is None: nothing is
    stored and the path is added to ``.empty``). The stored tensors keep
    their autograd graph (feature losses need it). Use as a context manager, or call
    `remove` when done; `clear` drops the stored tensors between steps.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], role: str = "student") -> None:
        self.role = role
        self.paths = list(dict.fromkeys(paths))
        self.features: dict[str, Tensor] = {}
        self.empty: set[str] = set()
        modules = [(path, resolve(model, path, role)) for path in self.paths]
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._hook(path)) for path, module in modules
        ]

    def _hook(self, path: str):  # noqa: ANN202 - hook signature is torch's
        index = split_path(path)[1]

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output) if index is None else _element(output, index, path)
            if tensor is not None:
                self.features[path] = tensor
            elif index is not None:
                self.empty.add(path)

        return hook

    def clear(self) -> None:
        """Forget the captured tensors."""
        self.features.clear()
        self.empty.clear()

    def remove(self) -> None:
        """Remove all hooks (idempotent); captured tensors stay until `clear`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> FeatureCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def feature_shapes(
    model: nn.Module, paths: Iterable[str], sample: Tensor, role: str = "student"
) -> dict[str, torch.Size]:
    """Shapes of each path's output for one no-grad forward of ``sample`` in eval mode.

    Every submodule's train/eval flag is restored afterwards. A path whose module does
    not run (or returns no tensor, or whose ``#k`` element is None) raises `InputError`.
    """
    paths = list(paths)
    modes = {m: m.training for m in model.modules()}
    try:
        with FeatureCapture(model, paths, role) as cap, torch.no_grad():
            model.eval()
            model(sample)
            shapes = {p: cap.features[p].shape for p in paths if p in cap.features}
            empty = [p for p in paths if p in cap.empty and p not in shapes]
    finally:
        for module, mode in modes.items():
            module.training = mode
    if empty:
        index = split_path(empty[0])[1]
        raise InputError(f"feature path {empty[0]!r} of the {role} model: element {index} of "
                         f"the module's output is None ({EAGER_HINT})")
    silent = [p for p in paths if p not in shapes]
    if silent:
        raise InputError(
            f"feature path {silent[0]!r} of the {role} model produced no tensor output "
            f"in a forward pass"
        )
    return shapes
