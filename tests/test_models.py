"""Model families, the model registry and safe weight I/O."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kd.errors import InputError
from kd.models import MODELS, build_model, count_params, model_size_bytes
from kd.models.weights import freeze, freeze_paths, load_into, load_state_dict, read_metadata, save_weights

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
IMAGE_MODELS = [
    "mlp", "cnn_small", "resnet8", "resnet14", "resnet20", "resnet32", "resnet8x4",
    "wrn_16_1", "wrn_16_2",
]


class TinyNet(nn.Module):
    """A user's own model, loaded as ``<this module>:TinyNet``."""

    def __init__(self, hidden: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class NoClasses(nn.Module):
    """A user's model whose constructor takes no ``num_classes``."""

    def __init__(self, out: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(64, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


EXECUTED: list[str] = []


def _payload(tag: str) -> str:
    """Would run if a pickle were trusted."""
    EXECUTED.append(tag)
    return tag


class Evil:
    """Pickles to a call of `_payload`."""

    def __reduce__(self):  # noqa: ANN204
        return (_payload, ("pwned",))


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("shape", [DIGITS, CIFAR])
def test_image_family_forward(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, {}, shape, 10)
    model.train()
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    out.sum().backward()  # every family is trainable end to end


@pytest.mark.parametrize("name", ["resnet56", "resnet110", "resnet32x4", "wrn_40_1", "wrn_40_2"])
def test_large_families_build_on_digits(name: str) -> None:
    model = build_model(name, {}, DIGITS, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *DIGITS)).shape == (2, 7)


@pytest.mark.parametrize("name", ["mlp", "cnn_small", "resnet20", "wrn_16_2", "text_encoder"])
def test_half_width_is_smaller_and_runs(name: str) -> None:
    shape = (12,) if name == "text_encoder" else DIGITS
    full = build_model(name, {}, shape, 10)
    half = build_model(name, {}, shape, 10, width=0.5)
    assert count_params(half) < count_params(full)
    assert model_size_bytes(half) < model_size_bytes(full)
    x = torch.randint(1, 50, (2, 12)) if name == "text_encoder" else torch.randn(2, *shape)
    assert half.eval()(x).shape == (2, 10)


def test_tiny_width_keeps_at_least_one_channel() -> None:
    model = build_model("cnn_small", {}, DIGITS, 10, width=0.001)
    assert model.block1.conv.out_channels == 1
    assert model(torch.randn(2, *DIGITS)).shape == (2, 10)


@pytest.mark.parametrize(("name", "published"), [("resnet20", 0.27e6), ("resnet56", 0.86e6)])
def test_resnet_param_counts_match_published(name: str, published: float) -> None:
    n = count_params(build_model(name, {}, CIFAR, 10))
    assert n == pytest.approx(published, rel=0.02)


def test_resnet_module_names() -> None:
    model = build_model("resnet20", {}, CIFAR, 10)
    names = dict(model.named_modules())
    for path in ["conv1", "bn1", "layer1", "layer2", "layer3", "fc", "layer3.1.conv2",
                 "layer3.2.bn2", "layer2.0.downsample"]:
        assert path in names, path
    assert model.conv1.in_channels == 3
    assert build_model("resnet20", {}, DIGITS, 10).conv1.in_channels == 1
    assert build_model("resnet8x4", {}, CIFAR, 10).layer3[0].conv2.out_channels == 256


def test_wrn_and_cnn_module_names() -> None:
    wrn = dict(build_model("wrn_16_2", {}, CIFAR, 10).named_modules())
    for path in ["conv1", "block1", "block2", "block3", "bn1", "fc", "block3.layer.1.conv2"]:
        assert path in wrn, path
    cnn = dict(build_model("cnn_small", {}, DIGITS, 10).named_modules())
    for path in ["block1", "block2", "block1.conv", "block2.bn", "fc"]:
        assert path in cnn, path
    assert 15_000 < count_params(build_model("cnn_small", {}, DIGITS, 10)) < 60_000


def test_mlp_args() -> None:
    model = build_model("mlp", {"hidden": [32, 16], "dropout": 0.1, "batchnorm": True},
                        DIGITS, 10)
    assert model.body[0].linear.in_features == 64
    assert [b.linear.out_features for b in model.body] == [32, 16]
    assert isinstance(model.body[1].bn, nn.BatchNorm1d)
    assert model(torch.randn(4, *DIGITS)).shape == (4, 10)
    assert build_model("mlp", {"hidden": []}, DIGITS, 3)(torch.randn(2, 64)).shape == (2, 3)


def test_text_encoder_on_token_ids() -> None:
    model = build_model("text_encoder", {"vocab_size": 100, "dim": 32, "depth": 1}, (16,), 5)
    ids = torch.randint(1, 100, (3, 16))
    ids[0, 8:] = 0  # padding
    ids[2, :] = 0  # all padding stays finite
    out = model.eval()(ids)
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    # padding does not change the pooled result of the real tokens
    short = model(ids[:1, :8])
    assert torch.allclose(short, out[:1], atol=1e-5)
    with pytest.raises(ValueError):
        model(torch.randn(2, 16))


def test_text_encoder_width_keeps_dim_divisible_by_heads() -> None:
    model = build_model("text_encoder", {"vocab_size": 50, "dim": 64, "heads": 4}, (8,), 2,
                        width=0.3)
    assert model.head.in_features % 4 == 0
    assert model(torch.randint(0, 50, (2, 8))).shape == (2, 2)


def test_unknown_model_name() -> None:
    with pytest.raises(InputError, match="unknown model 'resnet21'.*resnet20"):
        build_model("resnet21", {}, CIFAR, 10)


def test_bad_arg_names_the_argument() -> None:
    with pytest.raises(InputError, match="'cnn_small'.*'chanels'"):
        build_model("cnn_small", {"chanels": [8]}, DIGITS, 10)
    with pytest.raises(InputError, match="'hidden'"):
        build_model("mlp", {"hidden": "64"}, DIGITS, 10)
    with pytest.raises(InputError, match="'width'"):
        build_model("mlp", {"width": 2}, DIGITS, 10)
    with pytest.raises(InputError, match="input_shape"):
        build_model("resnet20", {}, (64,), 10)
    with pytest.raises(InputError, match="'depth'"):
        build_model("wrn", {"depth": 15}, CIFAR, 10)


def test_user_class_by_import_path() -> None:
    model = build_model(f"{__name__}:TinyNet", {"hidden": 5}, DIGITS, 4)
    assert isinstance(model, TinyNet)
    assert model.hidden == 5
    assert model(torch.randn(2, *DIGITS)).shape == (2, 4)
    # no num_classes parameter: called with args only
    assert isinstance(build_model(f"{__name__}:NoClasses", {"out": 3}, DIGITS, 4), NoClasses)
    with pytest.raises(InputError, match="TinyNet.*'depth'"):
        build_model(f"{__name__}:TinyNet", {"depth": 3}, DIGITS, 4)
    with pytest.raises(InputError, match="no 'Missing'"):
        build_model(f"{__name__}:Missing", {}, DIGITS, 4)


def test_registry_names_cover_the_families() -> None:
    for name in ["mlp", "cnn_small", "resnet8", "resnet110", "resnet32x4", "wrn_40_2",
                 "text_encoder"]:
        assert name in MODELS.names()


def test_save_and_load_safetensors_round_trip(tmp_path: Path) -> None:
    model = build_model("resnet8", {}, DIGITS, 10)
    path = tmp_path / "sub" / "w.safetensors"
    sha = save_weights(model, path, {"model": "resnet8", "classes": "10"})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not [p for p in path.parent.iterdir() if p.name != "w.safetensors"]  # no tmp left
    assert read_metadata(path) == {"model": "resnet8", "classes": "10"}
    sd, meta = load_state_dict(str(path))
    assert meta == {"model": "resnet8", "classes": "10"}
    other = build_model("resnet8", {}, DIGITS, 10)
    load_into(other, sd, "teacher")
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_save_handles_shared_and_noncontiguous_tensors(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    sd = {"a": base, "tied": base, "t": base.t(), "view": base[1:3]}
    save_weights(sd, tmp_path / "s.safetensors")
    loaded, meta = load_state_dict(str(tmp_path / "s.safetensors"))
    assert meta == {}
    for key, value in sd.items():
        assert torch.equal(loaded[key], value)


def test_empty_state_dict_round_trips(tmp_path: Path) -> None:
    save_weights(nn.ReLU(), tmp_path / "empty.safetensors")
    sd, _ = load_state_dict(str(tmp_path / "empty.safetensors"))
    assert sd == {}


def test_pt_file_loads_with_weights_only(tmp_path: Path) -> None:
    model = build_model("mlp", {"hidden": [8]}, DIGITS, 3)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "ddp.bin")
    for name in ["bare.pt", "wrapped.pth", "ddp.bin"]:
        sd, meta = load_state_dict(str(tmp_path / name))
        assert meta == {}
        fresh = build_model("mlp", {"hidden": [8]}, DIGITS, 3)
        load_into(fresh, sd, "student")
        assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_pickled_custom_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    EXECUTED.clear()
    with pytest.raises(InputError, match="refused"):
        load_state_dict(str(path))
    assert EXECUTED == []


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.safetensors"):
        load_state_dict(str(tmp_path / "nope.safetensors"))
    weird = tmp_path / "w.onnx"
    weird.write_bytes(b"x")
    with pytest.raises(InputError, match="w.onnx"):
        load_state_dict(str(weird))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="bad.safetensors"):
        load_state_dict(str(bad))


def test_folder_uri_picks_its_safetensors(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, str(tmp_path / "weights.safetensors"))
    sd, _ = load_state_dict(str(tmp_path))
    assert torch.equal(sd["x"], torch.ones(2))
    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    sd, _ = load_state_dict(str(tmp_path))
    assert torch.equal(sd["x"], torch.zeros(2))


def test_load_from_mlflow_run_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      request: pytest.FixtureRequest) -> None:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    # an earlier test in this process may have set a process-wide URI; use ours
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    request.addfinalizer(lambda: mlflow.set_tracking_uri(previous))
    model = build_model("mlp", {"hidden": [4]}, DIGITS, 2)
    local = tmp_path / "model.safetensors"
    save_weights(model, local, {"arch": "mlp"})
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(local), artifact_path="weights")
    sd, meta = load_state_dict(f"runs:/{run.info.run_id}/weights/model.safetensors")
    assert meta == {"arch": "mlp"}
    sd2, _ = load_state_dict(f"runs:/{run.info.run_id}/weights")
    assert sd.keys() == sd2.keys()
    client = mlflow.MlflowClient()
    client.create_registered_model("kd-student")
    version = client.create_model_version(
        "kd-student", source=f"{run.info.artifact_uri}/weights", run_id=run.info.run_id
    )
    client.set_registered_model_alias("kd-student", "champion", version.version)
    for uri in [f"models:/kd-student/{version.version}", "models:/kd-student@champion"]:
        sd3, meta3 = load_state_dict(uri)
        assert meta3 == {"arch": "mlp"} and sd3.keys() == sd.keys()
    with pytest.raises(InputError, match="runs:/"):
        load_state_dict(f"runs:/{run.info.run_id}/nothing/here.safetensors")


def test_load_into_wrong_architecture() -> None:
    sd = build_model("resnet8", {}, DIGITS, 10).state_dict()
    fit = r"teacher weights do not fit.*shape mismatch at fc\.weight"
    with pytest.raises(InputError, match=fit):
        load_into(build_model("resnet8", {}, DIGITS, 5), sd, "teacher")
    with pytest.raises(InputError, match=r"missing \d+ keys .*unexpected \d+"):
        load_into(build_model("resnet14", {}, DIGITS, 10), sd | {"extra": torch.zeros(1)},
                  "teacher")


def test_freeze_stops_grads() -> None:
    model = build_model("cnn_small", {}, DIGITS, 10).train()
    assert freeze(model) is model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    out = model(torch.randn(2, *DIGITS))
    assert not out.requires_grad


def test_load_from_s3(s3_server: str, bucket: str, tmp_path: Path) -> None:
    import boto3

    model = build_model("mlp", {"hidden": [4]}, DIGITS, 3)
    local = tmp_path / "model.safetensors"
    save_weights(model, local, {"arch": "mlp"})
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(local), bucket, "teachers/t.safetensors")
    sd, meta = load_state_dict(f"s3://{bucket}/teachers/t.safetensors")
    assert meta == {"arch": "mlp"}
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="no such object"):
        load_state_dict(f"s3://{bucket}/teachers/missing.safetensors")
    with pytest.raises(InputError, match="bucket does not exist"):
        load_state_dict("s3://no-such-bucket-kd/t.safetensors")


def test_freeze_paths_by_module_or_parameter_and_its_errors() -> None:
    """``student.freeze``: module paths and parameter names stop those gradients only; a
    path that names nothing, or freezing everything, is one line naming the field."""
    m = build_model("mlp", {"hidden": [16]}, (1, 8, 8), 10)
    assert freeze_paths(m, ["body.0", "fc.bias"], "student.freeze") == 64 * 16 + 16 + 10
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["fc.weight"]
    m(torch.rand(4, 1, 8, 8)).sum().backward()
    assert m.fc.weight.grad is not None and m.fc.bias.grad is None
    with pytest.raises(InputError, match=r"student.freeze\[1\]: 'body.7' is no module or parameter"):
        freeze_paths(m, ["fc", "body.7"], "student.freeze")
    with pytest.raises(InputError, match="freezes every parameter"):
        freeze_paths(build_model("mlp", {"hidden": [16]}, (1, 8, 8), 10), ["body", "fc"], "student.freeze")
