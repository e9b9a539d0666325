"""Model families and builders.

This package, `kd.errors` and `kd.plugins` import each other relatively and nothing else
of kdflow: they ship inside every registered model under the loader's own name
(`kd.registry.register.stage_code`).

Every registered factory is called as
``factory(input_shape=..., num_classes=..., width=..., **args)`` and returns an
``nn.Module`` mapping one batch to logits ``[B, num_classes]``. ``input_shape`` is
one sample's shape without the batch dimension: ``(C, H, W)`` for images, ``(L,)``
for token ids. ``width`` multiplies every hidden width / channel count.

A name of the form ``package.module:Class`` (see `kd.plugins.Registry`) names a
user's own model: it is called with ``**args`` only, plus ``num_classes`` when its
signature has a parameter of that name (and ``args`` does not set it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import InputError
from ..plugins import Registry

MODELS = Registry("model")

STD_KEYS = ("input_shape", "num_classes", "width")


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def _check_args(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise `InputError` naming the first argument ``fn`` does not accept."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins / C callables: let the call decide
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    for key in kwargs:
        if key not in accepted:
            shown = [a for a in accepted if a not in STD_KEYS]
            raise InputError(
                f"model {name!r} has no argument {key!r} "
                f"(accepted: {', '.join(shown) if shown else 'none'})"
            )
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise InputError(f"model {name!r}: {e}") from None


def build_model(
    name: str,
    args: dict[str, Any] | None,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float = 1.0,
) -> nn.Module:
    """Build model ``name`` for samples of ``input_shape`` and ``num_classes`` classes.

    Bad names, unknown or ill-typed arguments become a one-line `InputError`
    naming the model (and the argument where it can be told).
    """
    args = dict(args or {})
    input_shape = tuple(int(s) for s in input_shape)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"model {name!r}: num_classes must be a positive int, got {num_classes!r}")
    if not width > 0:
        raise InputError(f"model {name!r}: width must be > 0, got {width!r}")
    fn = MODELS.get(name)
    user = ":" in name and name not in MODELS.names()
    if user:
        kwargs = dict(args)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "num_classes" in params and "num_classes" not in kwargs:
            kwargs["num_classes"] = num_classes
    else:
        for key in STD_KEYS:
            if key in args:
                raise InputError(
                    f"model {name!r}: argument {key!r} is set by kdflow, remove it from args"
                )
        kwargs = {"input_shape": input_shape, "num_classes": num_classes, "width": width, **args}
    _check_args(name, fn, kwargs)
    try:
        model = fn(**kwargs)
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(f"model {name!r} rejected its arguments {args!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model {name!r} built a {type(model).__name__}, not a torch nn.Module")
    return model


def init_conv_bn(model: nn.Module) -> None:
    """He (fan-out) init for convolutions, BN scale 1 and shift 0, Linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    """Bytes taken by the parameters and buffers in their current dtypes (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Check that ``input_shape`` is ``(C, H, W)``; return it."""
    if len(input_shape) != 3 or math.prod(input_shape) <= 0:
        raise InputError(
            f"model {name!r} takes images shaped (C, H, W), got input_shape {tuple(input_shape)}"
        )
    return input_shape[0], input_shape[1], input_shape[2]


def int_list(name: str, arg: str, value: Any) -> list[int]:
    """``value`` as a list of positive ints, else `InputError` naming ``arg``."""
    if isinstance(value, (int, str)) or not hasattr(value, "__iter__"):
        raise InputError(f"model {name!r}: argument {arg!r} must be a list of ints, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(
                f"model {name!r}: argument {arg!r} must be a list of positive ints, got {value!r}"
            )
        out.append(v)
    return out


# Importing the families registers them.
from . import cnn, hf, mlp, resnet_cifar, static, text, wrn  # noqa: E402, F401

__all__ = ["MODELS", "build_model", "count_params", "model_size_bytes", "scaled"]
