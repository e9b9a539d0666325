"""Forward-hook feature capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd.errors import InputError
from kd.models import build_model
from kd.train.capture import FeatureCapture, check_paths, feature_shapes


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x


class WithTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = TupleOut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(x)[0].sum(1)


def _resnet20() -> nn.Module:
    return build_model("resnet20", {}, (3, 32, 32), 10)


def test_captures_resnet20_layer3_conv2() -> None:
    model = _resnet20()
    with FeatureCapture(model, ["layer3.1.conv2", "layer2"]) as cap:
        model(torch.randn(2, 3, 32, 32))
        assert cap.features["layer3.1.conv2"].shape == (2, 64, 8, 8)
        assert cap.features["layer2"].shape == (2, 32, 16, 16)
        assert cap.features["layer3.1.conv2"].requires_grad  # graph kept for feature losses
        cap.clear()
        assert cap.features == {}


def test_hooks_removed_after_context() -> None:
    model = _resnet20()
    conv = model.get_submodule("layer3.1.conv2")
    before = len(conv._forward_hooks)
    with FeatureCapture(model, ["layer3.1.conv2"]) as cap:
        assert len(conv._forward_hooks) == before + 1
    assert len(conv._forward_hooks) == before
    model(torch.randn(1, 3, 32, 32))
    assert cap.features == {}  # nothing captured once removed
    cap.remove()  # idempotent


def test_bad_path_lists_nearest_names() -> None:
    model = _resnet20()
    with pytest.raises(InputError) as err:
        FeatureCapture(model, ["layer3.1.conv3"], role="teacher")
    msg = str(err.value)
    assert "feature path 'layer3.1.conv3' not found in teacher model; nearest:" in msg
    assert "layer3.1.conv2" in msg
    assert "\n" not in msg
    with pytest.raises(InputError, match="student model"):
        check_paths(model, ["layer1", "nope"])
    check_paths(model, ["layer1", "layer3.2.bn2"])


def test_wrapped_model_resolves_inner_paths() -> None:
    inner = _resnet20()
    wrapped = Wrapper(inner)
    with FeatureCapture(wrapped, ["layer3.1.conv2", "module.layer1"]) as cap:
        wrapped(torch.randn(2, 3, 32, 32))
    assert cap.features["layer3.1.conv2"].shape == (2, 64, 8, 8)
    assert cap.features["module.layer1"].shape == (2, 16, 32, 32)


def test_tuple_output_keeps_first_tensor() -> None:
    model = WithTuple()
    x = torch.randn(2, 3)
    with FeatureCapture(model, ["pair"]) as cap:
        model(x)
    assert torch.equal(cap.features["pair"], x * 2)


def test_feature_shapes_dry_run_restores_modes() -> None:
    model = build_model("cnn_small", {}, (1, 8, 8), 10).train()
    model.block1.eval()  # a mixed state must survive
    running = model.block1.bn.running_mean.clone()
    shapes = feature_shapes(model, ["block1", "block2.conv"], torch.randn(4, 1, 8, 8))
    assert shapes == {"block1": torch.Size([4, 32, 4, 4]), "block2.conv": torch.Size([4, 64, 4, 4])}
    assert model.training and not model.block1.training and model.block2.training
    assert torch.equal(model.block1.bn.running_mean, running)  # eval: stats untouched
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(InputError, match="teacher"):
        feature_shapes(model, ["block9"], torch.randn(1, 1, 8, 8), role="teacher")
