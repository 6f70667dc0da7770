"""Reference Gumbel-softmax, Gumbel-max and perturb-max softmax (../shared/spec/softmaxes.md): the
specification every kxops backend is tested against, on the kernel contract's normalised arguments
(docs/gumbel_softmax_kernel_contract.md): x (R, N) rows, an int64 seed tensor of one element.

Pure PyTorch, differentiable, including the random bits: Philox4x32-10 in int64 arithmetic, so the
reference draws exactly the noise the kernels draw for the same seed. 16-bit inputs are computed in
float32 (as the kernels do); perturb-max is computed in float64 for every dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["philox4x32_10", "gumbel_bits", "uniforms", "gumbel_noise", "gumbel_softmax_ref",
           "gumbel_softmax_backward_ref", "gumbel_max_ref", "perturb_max_nodes", "perturb_max_ref",
           "perturb_max_backward_ref"]

_M32 = 0xFFFFFFFF
_SA, _SB = 0xD2511F53, 0xCD9E8D57        # Philox4x32 multipliers
_KA, _KB = 0x9E3779B9, 0xBB67AE85        # Weyl key bumps


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a 32-bit constant a and 32-bit values b (int64 tensor), without
    int64 overflow (16-bit limbs)."""
    a1, a0 = a >> 16, a & 0xFFFF
    b1, b0 = b >> 16, b & 0xFFFF
    mid = a1 * b0 + a0 * b1                       # < 2^33
    lo_full = a0 * b0 + ((mid & 0xFFFF) << 16)    # < 2^33
    lo = lo_full & _M32
    hi = a1 * b1 + (mid >> 16) + (lo_full >> 32)
    return hi & _M32, lo


def philox4x32_10(key, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor) -> tuple[Tensor, ...]:
    """Philox4x32-10 (Random123; ATen's at::philox_engine, Triton's tl.philox): the four 32-bit output words
    (int64 tensors with values in [0, 2^32)) of the counters (c0, c1, c2, c3) under the 64-bit key (an int, or
    an int64 tensor holding its bits: never read on the host, so the reference traces)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    for r in range(10):
        hi0, lo0 = _mulhilo(_SA, c0)
        hi1, lo1 = _mulhilo(_SB, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KA) & _M32, (k1 + _KB) & _M32
    return c0, c1, c2, c3


def gumbel_bits(seed: Tensor, R: int, N: int) -> Tensor:
    """(R, N) int64: the 32-bit word of every entry (the contract's counters: c = r * ceil(N/4) + i // 4, word
    i % 4 of the block, key = the seed's 64 bits)."""
    key = seed.reshape(-1)[:1]
    G = (N + 3) // 4
    dev = seed.device
    c = (torch.arange(R, dtype=torch.int64, device=dev)[:, None] * G
         + torch.arange(G, dtype=torch.int64, device=dev)[None, :])
    zero = torch.zeros_like(c)
    words = torch.stack(philox4x32_10(key, c & _M32, c >> 32, zero, zero), dim=-1)  # (R, G, 4)
    return words.reshape(R, 4 * G)[:, :N]


def uniforms(seed: Tensor, R: int, N: int) -> Tensor:
    """(R, N) float64: u = (2 (w >> 9) + 1) 2^-24 in [2^-24, 1 - 2^-24], exact in float32."""
    return ((gumbel_bits(seed, R, N) >> 9) * 2 + 1).to(torch.float64) * 2.0 ** -24


def _state(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gumbel_noise(seed: Tensor, R: int, N: int, dtype: torch.dtype) -> Tensor:
    """(R, N) Gumbel noise g = -log(-log u) in the state type of dtype (float32, or float64 for float64)."""
    u = uniforms(seed, R, N).to(_state(dtype))
    return -torch.log(-torch.log(u))


def gumbel_softmax_ref(x: Tensor, seed: Optional[Tensor], tau: float, hard: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Op 1 of the contract: (y, soft, index) for x (R, N); seed None: no noise."""
    R, N = x.shape
    v = x.to(_state(x.dtype))
    if seed is not None:
        v = v + gumbel_noise(seed, R, N, x.dtype).to(v.device)
    m = v.amax(dim=1, keepdim=True) if N else v.new_zeros(R, 1)
    dead = m == float("-inf")                                      # all -inf rows: y = 0, index = -1
    index = torch.where(dead[:, 0], -1, (v == m).to(torch.int8).argmax(dim=1))  # the lowest maximum
    s = (v - torch.where(dead, 0.0, m)) / tau
    soft = torch.where(dead, 0.0, torch.softmax(torch.where(dead, 0.0, s), dim=1))
    soft = soft.to(x.dtype)
    if not hard:
        return soft, x.new_empty((0,)), index
    onehot = torch.zeros_like(soft).scatter_(1, index.clamp_min(0)[:, None], 1.0)
    onehot = torch.where(dead, 0.0, onehot).to(x.dtype)
    return onehot + (soft - soft.detach()), soft, index          # exact one-hot, the soft gradient


def gumbel_softmax_backward_ref(dy: Tensor, y: Tensor, tau: float) -> Tensor:
    """Op 2: dx = y (dy - sum dy y) / tau per row."""
    s = _state(y.dtype)
    yy, g = y.to(s), dy.to(s)
    return (yy * (g - (g * yy).sum(dim=1, keepdim=True)) / tau).to(y.dtype)


def gumbel_max_ref(x: Tensor, seed: Tensor) -> Tensor:
    """Op 3: the sample index of every row (-1 for an all -inf row)."""
    return gumbel_softmax_ref(x.detach(), seed, 1.0, False)[2]


def perturb_max_nodes(K: int, device=None) -> Tensor:
    """The quadrature nodes z_k = Phi^-1(k / (K + 1)), k = 1..K, float64."""
    k = torch.arange(1, K + 1, dtype=torch.float64, device=device)
    return torch.special.ndtri(k / (K + 1))


def perturb_max_ref(x: Tensor, nodes: Tensor) -> Tensor:
    """Op 4: Gaussian perturb-max probabilities by quadrature, renormalised; float64 inside, x's dtype out.
    Memory O(R N^2 K): for tests."""
    xd = x.to(torch.float64)
    R, N = xd.shape
    fin = xd > float("-inf")                                      # (R, N): entries present
    xs = torch.where(fin, xd, 0.0)
    d = xs[:, :, None, None] - xs[:, None, :, None] + nodes.to(xd.device)[None, None, None, :]  # (R, i, j, K)
    pair = fin[:, :, None] & fin[:, None, :] & ~torch.eye(N, dtype=torch.bool, device=xd.device)[None]
    L = torch.where(pair[..., None], torch.special.log_ndtr(d), 0.0)
    S = L.sum(dim=2)                                              # (R, N, K)
    q = torch.where(fin, torch.exp(S).mean(dim=2), 0.0)
    Q = q.sum(dim=1, keepdim=True)
    p = torch.where(Q > 0, q / torch.where(Q > 0, Q, 1.0), 0.0)
    return p.to(x.dtype)


def perturb_max_backward_ref(dp: Tensor, x: Tensor, nodes: Tensor) -> Tensor:
    """Op 5 by autograd through the reference (float64 inside)."""
    with torch.enable_grad():
        xd = x.detach().to(torch.float64).requires_grad_(True)
        p = perturb_max_ref(xd, nodes)
        (dx,) = torch.autograd.grad(p, xd, dp.to(torch.float64))
    return dx.to(x.dtype)

