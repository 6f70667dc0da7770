"""GlobalPointer span scoring and the multi-label categorical cross-entropy in pure PyTorch: the
specification every kxops backend is proven equal to.

Follows ../shared/spec/global_pointer.md (Su Jianlin, kexue.fm 8373, 8877, 7359, 8888, 9064; bert4keras'
GlobalPointer, EfficientGlobalPointer and multilabel_categorical_crossentropy). Materialises the
(batch, types, L, L) logits, masks and dense labels, as every public implementation does: for tests.

Shapes: q, k (B, L, Hq, d) with Hq the number of types H, or 1 (Efficient GlobalPointer: one q/k shared
by every type, the types told apart by start_bias / end_bias (B, H, L)); mask (B, L), True / 1 for
tokens; logits (B, H, L, L) in float32 (float64 for float64 q); invalid spans are -inf.
"""
from __future__ import annotations

from typing import Optional

import torch

from .rope import rope_rotate, rope_schedule

REDUCTIONS = ("mean", "sum", "none")


def state_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def valid_spans(L: int, mask: Optional[torch.Tensor], tril: bool, device) -> torch.Tensor:
    """(B or 1, 1, L, L) bool: start and end are tokens, and end >= start when tril."""
    valid = torch.ones(L, L, dtype=torch.bool, device=device)
    if tril:
        valid = valid.triu()
    valid = valid[None, None]
    if mask is not None:
        m = mask.bool()
        valid = valid & m[:, None, :, None] & m[:, None, None, :]
    return valid


def global_pointer_logits(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None, *, rope: bool = True,
                          base: float = 10000.0, tril: bool = True, scale: Optional[float] = None,
                          start_bias: Optional[torch.Tensor] = None, end_bias: Optional[torch.Tensor] = None):
    """s[b, h, i, j] = scale * (R_i q[b, i, h]) . (R_j k[b, j, h]) + start_bias[b, h, i] + end_bias[b, h, j], RoPE
    with interleaved pairs at positions 0..L-1, scale None: d ** -0.5; -inf where the span is invalid.
    Computed in float32 (float64 for float64 q), q and k rotated in that dtype."""
    acc = state_dtype(q)
    B, L, _, d = q.shape
    qa, ka = q.to(acc), k.to(acc)
    if rope:
        inv_freq = rope_schedule(d, base, dtype=acc, device=q.device)[0]
        ang = torch.arange(L, device=q.device, dtype=acc)[None, :, None] * inv_freq  # (1, L, d/2)
        qa = rope_rotate(qa, ang, d, interleaved=True)
        ka = rope_rotate(ka, ang, d, interleaved=True)
    s = torch.einsum("bmhd,bnhd->bhmn", qa, ka) * (d ** -0.5 if scale is None else scale)
    if start_bias is not None:
        s = s + start_bias.to(acc)[..., :, None]
    if end_bias is not None:
        s = s + end_bias.to(acc)[..., None, :]
    return s.masked_fill(~valid_spans(L, mask, tril, q.device), float("-inf"))


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean() if loss.numel() else loss.sum() * float("nan")
    if reduction == "sum":
        return loss.sum()
    return loss


def multilabel_categorical_crossentropy(logits: torch.Tensor, targets: torch.Tensor,
                                        reduction: str = "mean") -> torch.Tensor:
    """Per row of logits (..., C): log(1 + sum_n (1 - t_n) e^(s_n)) + log(1 + sum_p t_p e^(-s_p)), over the finite
    logits (masked entries, -inf, are neither positives nor negatives); t in [0, 1] (0/1: hard labels, t = 0
    and 1 exact). Computed in float32 (float64 for float64 logits); reduction over the rows."""
    acc = state_dtype(logits)
    s, t = logits.to(acc), targets.to(acc)
    finite = torch.isfinite(s)
    ninf = torch.tensor(float("-inf"), dtype=acc, device=s.device)
    neg = torch.where(finite & (t < 1), s, ninf) + torch.log1p(-t.clamp(max=1))
    pos = torch.where(finite & (t > 0), -s, ninf) + torch.log(t)
    zero = s.new_zeros(s.shape[:-1] + (1,))
    loss = torch.logsumexp(torch.cat([neg, zero], -1), -1) + torch.logsumexp(torch.cat([pos, zero], -1), -1)
    return _reduce(loss, reduction)


def positives_to_dense(positive_indices: torch.Tensor, num_classes: int, mask_zero: bool = False) -> torch.Tensor:
    """(..., P) class indices -> (..., C) 0/1 targets (a set: an index given twice counts once); with
    mask_zero, index 0 is padding and class 0 is no class."""
    t = torch.zeros(positive_indices.shape[:-1] + (num_classes,), device=positive_indices.device)
    t.scatter_(-1, positive_indices.long(), 1.0)
    if mask_zero:
        t[..., 0] = 0
    return t


def sparse_multilabel_categorical_crossentropy(logits: torch.Tensor, positive_indices: torch.Tensor,
                                               mask_zero: bool = False, reduction: str = "mean") -> torch.Tensor:
    """The loss above with the positives given as indices (..., P) into the last dim of logits (..., C)
    (bert4keras' sparse version, computed exactly: the negatives' sum is never formed as a difference).
    mask_zero: class 0 is padding (never a positive nor a negative), as in bert4keras."""
    acc = state_dtype(logits)
    s = logits.to(acc)
    if mask_zero:
        s = torch.cat([torch.full_like(s[..., :1], float("-inf")), s[..., 1:]], -1)
    return multilabel_categorical_crossentropy(s, positives_to_dense(positive_indices, s.shape[-1], mask_zero).to(acc),
                                               reduction)


def span_labels_to_dense(labels: torch.Tensor, B: int, H: int, L: int, device) -> torch.Tensor:
    """Gold spans (N, 4) int64 [batch, type, start, end] -> (B, H, L, L) 0/1 labels (a set)."""
    t = torch.zeros(B, H, L, L, device=device)
    if labels.numel():
        b, h, i, j = labels.long().unbind(-1)
        t[b, h, i, j] = 1.0
    return t


def global_pointer_loss(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                        rope: bool = True, base: float = 10000.0, tril: bool = True, scale: Optional[float] = None,
                        start_bias: Optional[torch.Tensor] = None, end_bias: Optional[torch.Tensor] = None,
                        reduction: str = "mean") -> torch.Tensor:
    """The multi-label categorical cross-entropy of every (batch, type) row of L x L span logits; labels
    either sparse (N, 4) int64 gold spans [batch, type, start, end] or dense (B, H, L, L) in [0, 1].
    A gold span on an invalid (masked) span adds nothing. reduction: mean / sum over the B x H rows, or
    "none": (B, H)."""
    s = global_pointer_logits(q, k, mask, rope=rope, base=base, tril=tril, scale=scale, start_bias=start_bias,
                              end_bias=end_bias)
    B, H, L, _ = s.shape
    if labels.is_floating_point():
        t = labels.to(s.dtype)
    else:
        t = span_labels_to_dense(labels, B, H, L, s.device).to(s.dtype)
    loss = multilabel_categorical_crossentropy(s.reshape(B, H, L * L), t.reshape(B, H, L * L), "none")
    return _reduce(loss, reduction)


def global_pointer_decode(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                          threshold: float = 0.0, rope: bool = True, base: float = 10000.0, tril: bool = True,
                          scale: Optional[float] = None, start_bias: Optional[torch.Tensor] = None,
                          end_bias: Optional[torch.Tensor] = None):
    """Every valid span with logit > threshold: (spans (N, 4) int64 [batch, type, start, end] in row-major
    order, scores (N,) float32)."""
    s = global_pointer_logits(q, k, mask, rope=rope, base=base, tril=tril, scale=scale, start_bias=start_bias,
                              end_bias=end_bias)
    hit = s > threshold
    spans = hit.nonzero()
    return spans, s[hit]


def global_pointer(q, k, mask=None, *, rope=True, base=10000.0, tril=True, scale=None, start_bias=None,
                   end_bias=None):
    """kxops.global_pointer's arguments, computed by the reference."""
    return global_pointer_logits(q, k, mask, rope=rope, base=base, tril=tril, scale=scale, start_bias=start_bias,
                                 end_bias=end_bias)


# ----------------------------------------------------------------------------------------------
# The loss on the kernel contract's normalised arguments (docs/global_pointer_kernel_contract.md).

def logits_ref(q, k, mask, start_bias, end_bias, inv_freq, H: int, scale: float, tril: bool):
    """The span logits (B, H, L, L) in the state dtype on the normalised arguments: q, k (B, L, Hq, d) with
    Hq = H or 1; mask (B, L) bool or None; biases (B, H, L) or None; inv_freq (d/2,) or None (no RoPE;
    pairs interleaved at positions 0..L-1); invalid spans -inf. Differentiable in q, k and the biases."""
    acc = state_dtype(q)
    B, L, Hq, d = q.shape
    qa, ka = q.to(acc), k.to(acc)
    if inv_freq is not None:
        ang = torch.arange(L, device=q.device, dtype=acc)[None, :, None] * inv_freq.to(acc)
        qa = rope_rotate(qa, ang, d, interleaved=True)
        ka = rope_rotate(ka, ang, d, interleaved=True)
    s = torch.einsum("bmhd,bnhd->bhmn", qa, ka) * scale
    if Hq != H:
        s = s.expand(B, H, L, L)
    if start_bias is not None:
        s = s + start_bias.to(acc)[..., :, None]
    if end_bias is not None:
        s = s + end_bias.to(acc)[..., None, :]
    return s.masked_fill(~valid_spans(L, mask, tril, q.device), float("-inf"))


def decode_ref(q, k, mask, start_bias, end_bias, inv_freq, H: int, scale: float, tril: bool, threshold: float):
    """(spans (N, 4) int64 [batch, type, start, end] in row-major order, scores (N,) in the state dtype):
    every valid span whose logit exceeds threshold."""
    s = logits_ref(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril)
    hit = s > threshold
    return hit.nonzero(), s[hit]


def mlce_ref(x, targets, positives, mask_zero: bool):
    """The row losses on materialised logits x (R, C) (-inf: masked), labels dense targets (R, C) in [0, 1] or
    positive indices (R, P) (a set; mask_zero: index 0 is padding and class 0 no class): (loss, lse_neg,
    lse_pos), each (R,) in the state dtype. Differentiable in x."""
    acc = state_dtype(x)
    s = x.to(acc)
    if positives is not None:
        if mask_zero:
            s = torch.cat([torch.full_like(s[..., :1], float("-inf")), s[..., 1:]], -1)
        t = positives_to_dense(positives, s.shape[-1], mask_zero).to(acc)
    else:
        t = targets.to(acc)
    return _lse_pair(s, t)


def _lse_pair(s, t):
    """(lse_neg + lse_pos, lse_neg, lse_pos) over the last dim of s (-inf: excluded) with labels t."""
    finite = torch.isfinite(s)
    ninf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    zero = s.new_zeros(s.shape[:-1] + (1,))
    neg = torch.where(finite & (t < 1), s, ninf) + torch.log1p(-t.clamp(max=1))
    pos = torch.where(finite & (t > 0), -s, ninf) + torch.log(t)
    lse_neg = torch.logsumexp(torch.cat([neg, zero], -1), -1)
    lse_pos = torch.logsumexp(torch.cat([pos, zero], -1), -1)
    return lse_neg + lse_pos, lse_neg, lse_pos


def loss_ref(q, k, mask, start_bias, end_bias, inv_freq, H: int, scale: float, tril: bool, pos_offsets, pos_index,
             targets):
    """(loss, lse_neg, lse_pos), each (B, H) in the state dtype, on the normalised arguments of logits_ref and
    labels as CSR rows (pos_offsets (B*H + 1,), pos_index (N,) flat spans i*L + j) or dense targets
    (B, H, L, L). Differentiable in q, k and the biases."""
    acc = state_dtype(q)
    B, L = q.shape[0], q.shape[1]
    s = logits_ref(q, k, mask, start_bias, end_bias, inv_freq, H, scale, tril).reshape(B, H, L * L)
    if targets is not None:
        t = targets.to(acc).reshape(B, H, L * L)
    else:
        t = torch.zeros(B * H, L * L, dtype=acc, device=q.device)
        rows = torch.repeat_interleave(torch.arange(B * H, device=q.device),
                                       (pos_offsets[1:] - pos_offsets[:-1]).long())
        t[rows, pos_index.long()] = 1.0
        t = t.reshape(B, H, L * L)
    return _lse_pair(s, t)
