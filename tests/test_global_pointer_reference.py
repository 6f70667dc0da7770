"""The GlobalPointer reference (pyext/reference/global_pointer.py) against the spec's formulas written
another way: the relative-position form of the RoPE score, bert4keras' loss formulas, the sparse and
dense label forms, soft labels at 0 and 1, and rows that make other implementations return NaN. The
kernels of issue 8 will be proven equal to this reference."""
from __future__ import annotations

import math

import pytest
import torch

from kxops.reference import global_pointer as gp


def _rot(x, pos, base=10000.0):
    """RoPE with interleaved pairs of one vector x (d,) at position pos, in float64."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        a = pos * base ** (-2.0 * i / d)
        c, s = math.cos(a), math.sin(a)
        out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c
    return out


def test_logits_are_the_relative_position_form():
    """s(i, j) = q_i^T R_(j-i) k_j / sqrt(d) on valid spans, -inf elsewhere (padding, j < i)."""
    torch.manual_seed(0)
    B, L, H, d = 2, 5, 3, 6
    q, k = torch.randn(B, L, H, d, dtype=torch.float64), torch.randn(B, L, H, d, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    s = gp.global_pointer_logits(q, k, mask)
    assert s.dtype == torch.float64 and s.shape == (B, H, L, L)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(L):
                    if j < i or not (mask[b, i] and mask[b, j]):
                        assert s[b, h, i, j] == float("-inf")
                    else:
                        want = q[b, i, h] @ _rot(k[b, j, h], j - i) / math.sqrt(d)
                        assert abs(s[b, h, i, j] - want) < 1e-12


def test_efficient_biases_and_shared_heads():
    torch.manual_seed(1)
    B, L, H, d = 2, 4, 3, 4
    q, k = torch.randn(B, L, 1, d), torch.randn(B, L, 1, d)
    sb, eb = torch.randn(B, H, L), torch.randn(B, H, L)
    s = gp.global_pointer_logits(q, k, start_bias=sb, end_bias=eb, tril=False)
    base = gp.global_pointer_logits(q, k, tril=False)  # (B, 1, L, L)
    torch.testing.assert_close(s, base + sb[..., :, None] + eb[..., None, :])
    assert s.dtype == torch.float32


def _bert4keras_dense(s, t):
    """bert4keras' multilabel_categorical_crossentropy (hard labels; masked logits as -1e12)."""
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, -1e12))
    s = (1 - 2 * t) * s
    neg = s - t * 1e12
    pos = s - (1 - t) * 1e12
    z = torch.zeros_like(s[..., :1])
    return torch.logsumexp(torch.cat([neg, z], -1), -1) + torch.logsumexp(torch.cat([pos, z], -1), -1)


def test_dense_loss_matches_bert4keras_on_hard_labels():
    torch.manual_seed(2)
    s = torch.randn(6, 20, dtype=torch.float64) * 3
    t = (torch.rand(6, 20) < 0.2).double()
    s[0, :5] = float("-inf")  # masked entries (no positive among them: bert4keras would count it at -1e12)
    t[0, :5] = 0.0
    want = _bert4keras_dense(s, t)
    got = gp.multilabel_categorical_crossentropy(s, t, "none")
    torch.testing.assert_close(got, want)


def test_sparse_equals_dense_and_is_exact_where_bert4keras_loses_it():
    """The sparse form (indices, duplicates counted once) equals the dense one, also when the positives
    carry all the mass: bert4keras' a + log(1 - exp(b - a)) cancels to its clip there."""
    torch.manual_seed(3)
    s = torch.randn(4, 30, dtype=torch.float64)
    pos = torch.randint(0, 30, (4, 5))
    pos[1, 1] = pos[1, 0]  # a duplicate
    s[2, pos[2]] = 40.0  # positives dominate the row's log-sum-exp
    dense = gp.positives_to_dense(pos, 30).double()
    got = gp.sparse_multilabel_categorical_crossentropy(s, pos, reduction="none")
    torch.testing.assert_close(got, gp.multilabel_categorical_crossentropy(s, dense, "none"))
    neg = torch.where(dense.bool(), torch.full_like(s, float("-inf")), s)
    exact_neg = torch.logsumexp(torch.cat([neg, torch.zeros(4, 1, dtype=s.dtype)], -1), -1)
    exact_pos = torch.logsumexp(torch.cat([torch.where(dense.bool(), -s, torch.full_like(s, float("-inf"))),
                                           torch.zeros(4, 1, dtype=s.dtype)], -1), -1)
    torch.testing.assert_close(got, exact_neg + exact_pos)


def test_mask_zero_makes_class_zero_padding():
    torch.manual_seed(4)
    s = torch.randn(3, 10)
    pos = torch.tensor([[0, 0, 3], [2, 5, 0], [0, 0, 0]])  # 0: padding
    got = gp.sparse_multilabel_categorical_crossentropy(s, pos, mask_zero=True, reduction="none")
    s2 = s.clone()
    s2[:, 0] = float("-inf")  # class 0 is no class
    t = torch.zeros(3, 10)
    t[0, 3] = t[1, 2] = t[1, 5] = 1
    torch.testing.assert_close(got, gp.multilabel_categorical_crossentropy(s2, t, "none"))


def test_soft_labels_at_zero_and_one_are_hard_labels():
    torch.manual_seed(5)
    s = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(16)[:3] for _ in range(5)])
    soft = gp.multilabel_categorical_crossentropy(s, gp.positives_to_dense(idx, 16).double(), "none")
    hard = gp.sparse_multilabel_categorical_crossentropy(s, idx, reduction="none")
    torch.testing.assert_close(soft, hard)
    torch.testing.assert_close(torch.autograd.grad(soft.sum(), s)[0], torch.autograd.grad(hard.sum(), s)[0])
    # a soft label weighs the entry as a negative by (1 - t) and as a positive by t
    t = torch.zeros(1, 16, dtype=torch.float64)
    t[0, 4] = 0.3
    x = s.detach()[:1]
    want = torch.log1p(x.exp().sum() - 0.3 * x[0, 4].exp()) + torch.log1p(0.3 * (-x[0, 4]).exp())
    torch.testing.assert_close(gp.multilabel_categorical_crossentropy(x, t), want)


@pytest.mark.parametrize("row", ["no-positive", "only-positives", "positive-at-inf", "all-masked"])
def test_rows_other_implementations_turn_into_nan(row):
    s = torch.randn(1, 8, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(1, 8, dtype=torch.float64)
    with torch.no_grad():
        x = s.clone()
    if row == "only-positives":
        t[:] = 1
    if row == "positive-at-inf":
        t[0, :3] = 1
        x[0, 0] = float("-inf")
    if row == "all-masked":
        x[:] = float("-inf")
        t[0, 2] = 1
    x = s + (x - s).detach()  # s's values replaced, s still the leaf
    loss = gp.multilabel_categorical_crossentropy(x, t)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    if row == "all-masked":
        assert loss == 0 and (g == 0).all()
    if row == "positive-at-inf":
        assert g[0, 0] == 0


def test_span_loss_sparse_equals_dense_and_decode_is_the_positive_logits():
    torch.manual_seed(6)
    B, L, H, d = 2, 6, 3, 8
    q, k = torch.randn(B, L, H, d), torch.randn(B, L, H, d)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    spans = torch.tensor([[0, 0, 1, 3], [0, 2, 0, 0], [1, 1, 2, 5], [1, 0, 3, 2]])  # the last two: invalid spans
    dense = gp.span_labels_to_dense(spans, B, H, L, q.device)
    a = gp.global_pointer_loss(q, k, spans, mask, reduction="none")
    b = gp.global_pointer_loss(q, k, dense, mask, reduction="none")
    assert a.shape == (B, H)
    torch.testing.assert_close(a, b)
    logits = gp.global_pointer_logits(q, k, mask)
    got, scores = gp.global_pointer_decode(q, k, mask, threshold=0.5)
    want = (logits > 0.5).nonzero()
    assert torch.equal(got, want)
    torch.testing.assert_close(scores, logits[tuple(want.T)])
