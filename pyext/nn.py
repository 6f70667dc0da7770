"""kxops.nn: modules over the fused ops, with the parameter names and layouts of the modules users have, so
that a state_dict trained there loads unchanged.

GlobalPointer and EfficientGlobalPointer keep bert4torch's (bert4torch/layers/global_point.py): the same
dense layers under the same names, q and k cut from their outputs the same way, RoPE with interleaved
pairs (bert4torch's default 'adjacent'), the same scale. The logits equal bert4torch's on every valid
span; where bert4torch subtracts 1e12 below the diagonal (and puts -inf at padding), kxops puts -inf.
`.loss` and `.decode` run the fused loss and decoding on the same q and k, never building the logits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .global_pointer import global_pointer, global_pointer_decode, global_pointer_loss

__all__ = ["GlobalPointer", "EfficientGlobalPointer"]


class _SpanScorer(torch.nn.Module):
    """What both modules share: forward (the logits), loss and decode over their q, k (and biases)."""

    heads: int
    head_size: int
    RoPE: bool
    tril_mask: bool

    def _qk(self, hidden: Tensor):
        raise NotImplementedError

    def _options(self) -> dict:
        return dict(rope=self.RoPE, tril=self.tril_mask, scale=self.head_size ** -0.5)

    def forward(self, hidden: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """hidden (batch, L, hidden_size), mask (batch, L) (1 / True: token) -> logits (batch, heads, L, L)."""
        q, k, bias = self._qk(hidden)
        return global_pointer(q, k, mask, **bias, **self._options())

    def loss(self, hidden: Tensor, mask: Optional[Tensor], labels: Tensor, reduction: str = "mean") -> Tensor:
        """The fused multi-label categorical cross-entropy (kxops.global_pointer_loss): labels are int64 gold
        spans (N, 4) [batch, type, start, end] or dense (batch, heads, L, L) in [0, 1]."""
        q, k, bias = self._qk(hidden)
        return global_pointer_loss(q, k, labels, mask, reduction=reduction, **bias, **self._options())

    def decode(self, hidden: Tensor, mask: Optional[Tensor] = None, threshold: float = 0.0):
        """(spans (N, 4) int64 [batch, type, start, end], scores (N,)): every valid span scoring above
        threshold, without the logits tensor."""
        q, k, bias = self._qk(hidden)
        return global_pointer_decode(q, k, mask, threshold=threshold, **bias, **self._options())


class GlobalPointer(_SpanScorer):
    """GlobalPointer (Su, kexue.fm 8373) with bert4torch's parameters: `dense` (hidden_size ->
    heads * head_size * 2), whose output holds per head [q (head_size) | k (head_size)]."""

    def __init__(self, hidden_size: int, heads: int, head_size: int, RoPE: bool = True, use_bias: bool = True,
                 tril_mask: bool = True):
        super().__init__()
        self.heads, self.head_size, self.RoPE, self.tril_mask = heads, head_size, RoPE, tril_mask
        self.dense = torch.nn.Linear(hidden_size, heads * head_size * 2, bias=use_bias)

    def _qk(self, hidden):
        x = self.dense(hidden)
        x = x.view(*x.shape[:-1], self.heads, 2 * self.head_size)
        return x[..., :self.head_size], x[..., self.head_size:], {}


class EfficientGlobalPointer(_SpanScorer):
    """Efficient GlobalPointer (Su, kexue.fm 8877) with bert4torch's parameters: `p_dense` (hidden_size ->
    head_size * 2, [q | k] halves, shared by every type) and `q_dense` (head_size * 2 -> heads * 2, applied
    to the un-rotated [q | k]; per type (start, end), halved)."""

    def __init__(self, hidden_size: int, heads: int, head_size: int, RoPE: bool = True, use_bias: bool = True,
                 tril_mask: bool = True):
        super().__init__()
        self.heads, self.head_size, self.RoPE, self.tril_mask = heads, head_size, RoPE, tril_mask
        self.p_dense = torch.nn.Linear(hidden_size, head_size * 2, bias=use_bias)
        self.q_dense = torch.nn.Linear(head_size * 2, heads * 2, bias=use_bias)

    def _qk(self, hidden):
        x = self.p_dense(hidden)  # (batch, L, 2 head_size)
        q, k = x[..., None, :self.head_size], x[..., None, self.head_size:]  # (batch, L, 1, head_size)
        bias = self.q_dense(x).view(*x.shape[:-1], self.heads, 2).transpose(1, 2) / 2  # (batch, heads, L, 2)
        return q, k, dict(start_bias=bias[..., 0], end_bias=bias[..., 1])
