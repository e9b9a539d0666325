"""Embedding metrics (kd.train.embed_metrics) on small cases worked out by hand.

Points on the unit circle at given angles: cosine order = angular distance order, so
nearest neighbours and retrieval ranks can be read off the angles."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from kd.errors import InputError
from kd.models import build_model
from kd.train.embed_metrics import (
    cosine_rows,
    encode,
    encode_rate,
    neighbour_agreement,
    recall_at_k,
    trim_pad,
)


def circle(*degrees: float, scale: float = 1.0) -> torch.Tensor:
    """``[N, 2]`` points at ``degrees`` on a circle of radius ``scale``."""
    r = [math.radians(d) for d in degrees]
    return scale * torch.tensor([[math.cos(a), math.sin(a)] for a in r])


def test_cosine_rows_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    t = torch.tensor([[5.0, 0.0], [1.0, 0.0], [4.0, 3.0], [1.0, 1.0]])
    # same direction, orthogonal, (12 + 12) / (5 * 5), a zero row
    assert torch.allclose(cosine_rows(s, t), torch.tensor([1.0, 0.0, 0.96, 0.0]), atol=1e-6)


def test_cosine_rows_rejects_mismatched_shapes() -> None:
    with pytest.raises(InputError, match=r"cosine_rows: .*\(3, 2\) and \(3, 4\)"):
        cosine_rows(torch.zeros(3, 2), torch.zeros(3, 4))


def test_neighbour_agreement_by_hand() -> None:
    # teacher nearest: 0->1 (10°), 1->0 (10° vs 20°), 2->1 (20°), 3->4 (30°), 4->3
    t = circle(0, 10, 30, 100, 130)
    # student nearest: 0->1 (25°), 1->2 (5°), 2->1, 3->4 (60° vs 70°), 4->3: row 1 differs;
    # row 1's two nearest under the student are 2 (5°) and 0 (25°): the teacher's 0 is there
    s = circle(0, 25, 30, 100, 160, scale=3.0)
    assert neighbour_agreement(s, t, k=2) == {"nn_top1": 0.8, "nn_top2": 1.0}
    # k=1: the teacher's neighbour must be the student's nearest
    assert neighbour_agreement(s, t, k=1) == {"nn_top1": 0.8}
    assert neighbour_agreement(t, t) == {"nn_top1": 1.0, "nn_top5": 1.0}  # k capped at N - 1
    # widths may differ: the same angles embedded in 3-D
    s3 = torch.cat([s, torch.zeros(5, 1)], dim=1)
    assert neighbour_agreement(s3, t, k=2) == {"nn_top1": 0.8, "nn_top2": 1.0}
    with pytest.raises(InputError, match="neighbour_agreement: .* same N"):
        neighbour_agreement(s[:4], t)


def test_neighbour_agreement_excludes_self_and_chunks() -> None:
    # every row is its own most similar row; excluding it, the teacher pairs 0<->1, 2<->3
    t = circle(0, 40, 180, 200)
    # student (3 at 300° = -60°): 0->1 (40° vs 60°), 1->0 (40°), 2->3 (120° vs 140°), 3->0 (60°);
    # rows 0, 1, 2 agree; row 3's two nearest are 0 and 1, not the teacher's 2
    s = circle(0, 40, 180, 300)
    whole = neighbour_agreement(s, t, k=2)
    assert whole == {"nn_top1": 0.75, "nn_top2": 0.75}
    assert neighbour_agreement(s, t, k=2, chunk=1) == whole == neighbour_agreement(s, t, k=2, chunk=3)


def test_neighbour_agreement_fits_ten_thousand_rows() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10_000, 32, generator=g)
    out = neighbour_agreement(t + 1e-4 * torch.randn(10_000, 32, generator=g), t)
    assert out["nn_top1"] > 0.99 and out["nn_top5"] > 0.99
    assert neighbour_agreement(torch.randn(1000, 32, generator=g), t[:1000])["nn_top5"] < 0.05


def test_recall_at_k_by_hand() -> None:
    q = circle(0, 90, 180)
    d = circle(10, 150, 100)
    # q0 -> d0 at 10°, the others at 100° and 150°: rank 0;
    # q1 (90°) -> d1 at 60°, but d2 is at 10°: rank 1;
    # q2 (180°) -> d2 at 80°, but d1 is at 30°: rank 1
    out = recall_at_k(q, d, ks=(1, 2))
    assert out == {"recall_at_1": pytest.approx(1 / 3), "recall_at_2": 1.0}
    assert recall_at_k(q, d) == {"recall_at_1": pytest.approx(1 / 3), "recall_at_10": 1.0}
    assert recall_at_k(q, d, ks=(1, 2), chunk=1) == out


def test_recall_ties_count_against_the_query() -> None:
    q = circle(0, 90, 180)
    d = torch.ones(3, 2)  # every document the same vector
    assert recall_at_k(q, d, ks=(1, 2, 3)) == {"recall_at_1": 0.0, "recall_at_2": 0.0, "recall_at_3": 1.0}


def test_trim_pad() -> None:
    ids = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 8, 0, 0]])
    assert trim_pad(ids, 0).tolist() == [[5, 6, 0], [7, 0, 8]]
    assert trim_pad(torch.zeros(2, 4, dtype=torch.long), 0).shape == (2, 1)
    assert trim_pad(ids, 9).shape == (2, 5)


class Recorder(nn.Module):
    """Sums its (float) inputs per row, sleeping ``pause`` seconds per call; records widths."""

    def __init__(self, pause: float = 0.0) -> None:
        super().__init__()
        self.pause = pause
        self.widths: list[int] = []
        self.grad: list[bool] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.widths.append(ids.shape[1])
        self.grad.append(torch.is_grad_enabled() or self.training)
        time.sleep(self.pause)
        return ids.float().sum(dim=1, keepdim=True)


def test_encode_trims_each_batch_and_restores_mode() -> None:
    ids = torch.tensor([[1, 2, 0, 0], [4, 5, 6, 0], [7, 0, 0, 0]])
    m = Recorder()
    m.train()
    out = encode(m, ids, batch_size=2)
    # batched by length: rows 2 and 0 (width 2), then row 1 (width 3); outputs in row order
    assert out.tolist() == [[3.0], [15.0], [7.0]]
    assert m.widths == [2, 3] and m.grad == [False, False] and m.training


def test_encode_rate_counts_sentences_per_second() -> None:
    ids = torch.ones(10, 6, dtype=torch.long)
    ids[:, 4:] = 0
    m = Recorder(pause=0.02)
    rate = encode_rate(m, ids, batch_size=4, repeats=3)
    # 3 batches of >= 20 ms each per pass: at most 10 / 0.06 sentences/s
    assert 20 < rate <= 10 / 0.06
    assert m.widths == [4] * 10 and not any(m.grad)  # 1 warm-up + 3 passes x 3 batches


def test_encode_rate_on_a_text_encoder() -> None:
    model = build_model("text_encoder", {"max_len": 16}, (16,), 384)
    ids = torch.randint(1, 30522, (20, 16))
    ids[:, 10:] = 0
    assert encode_rate(model, ids, batch_size=8, repeats=1) > 0
    assert encode(model, ids, batch_size=8).shape == (20, 384)
    with pytest.raises(InputError, match="encode_rate"):
        encode_rate(model, ids[:0])


def test_forward_by_length_equals_one_forward_values_and_gradients() -> None:
    """A text step forwards rows grouped by length (kd.train.step): the outputs and the
    gradients equal those of one padded forward, for a model that masks by pad id."""
    from kd.models import build_model
    from kd.train.embed_metrics import forward_by_length

    torch.manual_seed(0)
    model = build_model("bert_student", {"vocab_size": 100, "hidden": 32, "layers": 2, "heads": 4,
                                         "intermediate": 64, "max_len": 32}, (24,), 16)
    model.eval()  # no dropout: the two paths must match exactly
    lengths = torch.tensor([3, 24, 7, 1, 12, 5, 20, 9, 2])
    ids = torch.zeros(len(lengths), 24, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 100, (int(n),))
    target = torch.randn(len(lengths), 16)
    one = model(ids)
    (one * target).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    grouped = forward_by_length(model, ids, 0, chunk=4)
    (grouped * target).sum().backward()
    assert torch.allclose(grouped, one, atol=1e-5)
    for g, w in zip([p.grad for p in model.parameters()], want):
        assert torch.allclose(g, w, atol=1e-5)
