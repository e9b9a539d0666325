"""Two real Ray Train workers distilling: KD + FitNets (a learned adapter) with the
confidence filter set so that, in many steps, one rank keeps no sample while the other
keeps some. The run must finish, and both ranks must end with the same adapter (and
student) weights: the ranks' actual tensors are gathered (`tests.rank_probe`) and
compared, and the loop's own checksum check ran at every checkpoint.

On the code before the fix this fails: the adapters were built under per-rank seeds
(different on each rank from step 0), and a rank whose filter kept nothing skipped the
adapters' all-reduce, so the collectives fell out of step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kd.config import experiment_from_dict, resolve_paths


def _teacher(path: Path) -> float:
    """Save a randomly initialised MLP teacher; return a confidence threshold that
    about 10% of the digits pass (so with 2 rows per rank and step, a rank keeps
    nothing in ~81% of steps and the other rank keeps some in ~19% of those)."""
    from kd.data.builtin import digits
    from kd.losses.composite import teacher_confidence
    from kd.models import build_model
    from kd.models.weights import save_weights

    torch.manual_seed(123)
    t = build_model("mlp", {"hidden": [64]}, (1, 8, 8), 10, 1.0)
    save_weights(t, path, {"kd.num_classes": "10"})
    x = torch.as_tensor(digits()[0])  # the loop's inputs: [N, 1, 8, 8] in [0, 1]
    with torch.no_grad():
        conf = teacher_confidence(t(x)).numpy()
    return float(np.quantile(conf, 0.9))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_workers_kd_fitnets_filter_ranks_agree(ray_session: None, workdir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import kd.train.driver as driver
    from kd.train.run import train_run
    from tests.rank_probe import probe_loop

    threshold = _teacher(workdir / "teacher.safetensors")
    doc = {
        "name": "kd2", "seed": 0, "data": {"source": "digits"},
        "teacher": {"model": "mlp", "args": {"hidden": [64]},
                    "weights": str(workdir / "teacher.safetensors")},
        "student": {"model": "mlp", "args": {"hidden": [32]}, "freeze": ["fc.bias"]},
        "distill": {"ce_weight": 0.5, "min_teacher_confidence": threshold, "losses": [
            {"name": "kd", "weight": 1.0},
            {"name": "fitnet", "weight": 1.0, "student": "body.0", "teacher": "body.0"}]},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": {"name": "none"}},
        "trainer": {"epochs": 2, "batch_size": 4},
        "checkpoint": {"every_epochs": 1, "keep": 1},
        "scaling": {"num_workers": 2},
        "tracking": {"uri": f"sqlite:///{workdir / 'mlflow.db'}", "experiment": "kd2"},
        "storage": {"path": str(workdir / "runs")},
    }
    exp = resolve_paths(experiment_from_dict(doc))
    monkeypatch.setattr(driver, "train_loop_per_worker", probe_loop)
    out = train_run(exp, "student", run_name="kd2-run")
    assert out.metrics["epoch"] == 2
    assert 0.02 < out.metrics["train/distilled_fraction"] < 0.3  # the filter really bit
    states = torch.load(workdir / "runs" / "kd2-run" / "rank_states.pt", weights_only=True)
    assert len(states) == 2
    adapters = [k for k in states[0]["loss"] if "adapters" in k]
    assert adapters, sorted(states[0]["loss"])  # the FitNets regressor is there
    for part in ("loss", "trainee"):
        assert states[0][part].keys() == states[1][part].keys()
        for k, v in states[0][part].items():
            assert torch.equal(v, states[1][part][k]), f"{part} {k} differs between ranks"
    # The adapter trained (it is not still its initial value): rank 0's checkpoint
    # adapter equals both ranks' final one.
    from safetensors.torch import load_file

    saved = load_file(workdir / "runs" / "kd2-run" / "epoch_00002" / "loss.safetensors")
    assert all(torch.equal(saved[k], states[1]["loss"][k]) for k in adapters)
    # student.freeze: the frozen parameter is still the one built under the run's seed
    # on both ranks (DDP and the optimizer left it alone); the rest of the student trained
    from kd.models import build_model

    torch.manual_seed(0)
    init = build_model("mlp", {"hidden": [32]}, (1, 8, 8), 10, 1.0).state_dict()
    assert torch.equal(states[0]["trainee"]["fc.bias"], init["fc.bias"])
    assert not torch.equal(states[0]["trainee"]["fc.weight"], init["fc.weight"])
