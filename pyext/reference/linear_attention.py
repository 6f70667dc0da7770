"""Linear attention in pure PyTorch: the specification every kxops backend is proven equal to.

Follows ../shared/spec/linear_attention.md (Su Jianlin, kexue.fm 7546; Katharopoulos et al. 2020) and,
for RoPE in the numerator, kexue.fm 8265. The materialised cumulative-sum form: O(T d^2) memory, for
tests only. Shapes: q, k (batch, seq, heads, Dk), v (batch, seq, heads, Dv); the state is
S (N, heads, Dk', Dv) and z (N, heads, Dk') with N = batch (or the number of packed sequences) and
Dk' the feature size (Dk, or Dk + 1 for the Taylor map).
"""
from __future__ import annotations

from typing import Optional

import torch

from .rope import rope_rotate

FEATURE_MAPS = ("identity", "elu1", "relu", "taylor")  # kernel ids 0, 1, 2, 3
TAYLOR_NORM_MIN = 1e-12  # |x| is clamped here in x / |x| (as torch.nn.functional.normalize)


def feature_size(head_dim: int, feature_map: str) -> int:
    return head_dim + 1 if feature_map == "taylor" else head_dim


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """phi(x) over the last dimension: elu(x)+1, relu(x), x, or Su's first-order Taylor [1, x/|x|]."""
    if feature_map == "identity":
        return x
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "taylor":
        n = x.norm(dim=-1, keepdim=True).clamp_min(TAYLOR_NORM_MIN)
        return torch.cat((torch.ones_like(x[..., :1]), x / n), -1)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def rotate_features(f: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, interleaved: bool,
                    feature_map: str) -> torch.Tensor:
    """RoPE of feature vectors f (B, T, H, Dk') at integer positions pos (B or 1, T): the rotation acts on
    the Dk features of phi that come from x (for the Taylor map, all but the leading constant 1)."""
    ang = pos.to(inv_freq.dtype)[..., None] * inv_freq  # (B|1, T, R/2)
    if feature_map == "taylor":
        return torch.cat((f[..., :1], rope_rotate(f[..., 1:], ang, f.shape[-1] - 1, interleaved)), -1)
    return rope_rotate(f, ang, f.shape[-1], interleaved)


def token_positions(T: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
    """Default RoPE positions (1, T): 0.. in every sequence (restarting at each packed sequence)."""
    t = torch.arange(T, device=device)
    if cu_seqlens is None:
        return t[None]
    cu = cu_seqlens.long()
    return (t - cu[torch.searchsorted(cu, t, right=True) - 1])[None]


def _one(q, k, v, S0, z0, pos, inv_freq, interleaved, feature_map, scale, normalize, eps, causal):
    """One batch of equal-length sequences: q, k (B, T, H, Dk), v (B, T, H, Dv) in the state dtype."""
    fq = scale * feature(q, feature_map)
    fk = feature(k, feature_map)
    rq, rk = fq, fk
    if inv_freq is not None:
        rq = rotate_features(fq, pos, inv_freq, interleaved, feature_map)
        rk = rotate_features(fk, pos, inv_freq, interleaved, feature_map)
    kv = torch.einsum("bthd,bthe->bthde", rk, v)
    if causal:
        S = kv.cumsum(1) + S0[:, None]  # S_t: state after token t, (B, T, H, Dk', Dv)
        z = fk.cumsum(1) + z0[:, None]
        num = torch.einsum("bthd,bthde->bthe", rq, S)
        den = (fq * z).sum(-1)
        S_final, z_final = S[:, -1] if q.shape[1] else S0, z[:, -1] if q.shape[1] else z0
    else:
        S_final = kv.sum(1) + S0
        z_final = fk.sum(1) + z0
        num = torch.einsum("bthd,bhde->bthe", rq, S_final)
        den = torch.einsum("bthd,bhd->bth", fq, z_final)
    out = num / (den[..., None] + eps) if normalize else num
    return out, S_final, z_final


def linear_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S0: Optional[torch.Tensor] = None,
                         z0: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                         positions: Optional[torch.Tensor] = None, inv_freq: Optional[torch.Tensor] = None,
                         interleaved: bool = False, feature_map: str = "elu1", scale: float = 1.0,
                         normalize: bool = True, eps: float = 1e-6, causal: bool = True):
    """The reference on the kernel contract's normalised arguments (docs/linear_attention_kernel_contract.md):
    returns (out (B, T, H, Dv) in q's dtype, S (N, H, Dk', Dv), z (N, H, Dk')), the state in float32
    (float64 for float64 q). Differentiable in q, k, v, S0 and z0. Packed input: (1, total, H, D) with
    cu_seqlens, one state per sequence. inv_freq None: no RoPE; positions None: 0.. per sequence."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    F = feature_size(Dk, feature_map)
    N = cu_seqlens.numel() - 1 if cu_seqlens is not None else B
    S0 = torch.zeros(N, H, F, Dv, dtype=acc, device=q.device) if S0 is None else S0.to(acc)
    z0 = torch.zeros(N, H, F, dtype=acc, device=q.device) if z0 is None else z0.to(acc)
    if inv_freq is not None:
        inv_freq = inv_freq.to(acc)
        positions = token_positions(T, cu_seqlens, q.device) if positions is None else positions
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    args = (inv_freq, interleaved, feature_map, scale, normalize, eps, causal)
    if cu_seqlens is None:
        out, S, z = _one(qa, ka, va, S0, z0, positions, *args)
        return out.to(q.dtype), S, z
    outs, Ss, zs = [], [], []
    cu = cu_seqlens.tolist()
    for n in range(N):
        a, b = cu[n], cu[n + 1]
        pos = None if positions is None else positions[:, a:b]
        o, S, z = _one(qa[:, a:b], ka[:, a:b], va[:, a:b], S0[n:n + 1], z0[n:n + 1], pos, *args)
        outs.append(o)
        Ss.append(S)
        zs.append(z)
    out = torch.cat(outs, 1) if outs else qa.new_zeros(1, 0, H, Dv)
    return out.to(q.dtype), torch.cat(Ss), torch.cat(zs)


def linear_attention_step_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, z: torch.Tensor,
                              feature_map: str = "elu1", scale: float = 1.0, normalize: bool = True,
                              eps: float = 1e-6):
    """One decoding step: q, k (B, H, Dk), v (B, H, Dv), state S (B, H, Dk', Dv), z (B, H, Dk') ->
    (out (B, H, Dv) in q's dtype, S', z'): the causal form at the new token."""
    acc = S.dtype
    out, S1, z1 = _one(q[:, None].to(acc), k[:, None].to(acc), v[:, None].to(acc), S, z, None, None, False,
                       feature_map, scale, normalize, eps, True)
    return out[:, 0].to(q.dtype), S1, z1


# ----------------------------------------------------------------------------------------------
# The public functions' arguments, computed by the specification (no argument checks: kxops makes them).

def linear_attention(q, k, v, *, causal=True, feature_map="elu1", normalize=True, eps=1e-6, scale=None,
                     initial_state=None, output_final_state=False, cu_seqlens=None, rope=False, rope_base=10000.0,
                     positions=None, interleaved=False):
    """kxops.linear_attention's arguments, computed by the reference (eager PyTorch, differentiable)."""
    from .rope import rope_schedule

    Dk = q.shape[-1]
    packed = cu_seqlens is not None
    q4, k4, v4 = (t[None] for t in (q, k, v)) if packed else (q, k, v)
    S0, z0 = initial_state if initial_state is not None else (None, None)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    inv_freq = rope_schedule(Dk, rope_base, dtype=acc, device=q.device)[0] if rope else None
    pos = None
    if rope and positions is not None:
        pos = positions[None] if positions.dim() == 1 else positions
    out, S, z = linear_attention_ref(q4, k4, v4, S0, z0, cu_seqlens, pos, inv_freq, interleaved, feature_map,
                                     Dk ** -0.5 if scale is None else scale, normalize, eps, causal)
    out = out[0] if packed else out
    return (out, (S, z)) if output_final_state else out


def causal_dot_product(q, k, v):
    """out_i = sum_(j<=i) (q_i . k_j) v_j."""
    return linear_attention(q, k, v, feature_map="identity", normalize=False, scale=1.0)


def linear_attention_step(q, k, v, state, *, feature_map="elu1", normalize=True, scale=None, eps=1e-6):
    """kxops.linear_attention_step's arguments, computed by the reference: q, k (B, H, Dk) or (B, 1, H, Dk)."""
    one = q.dim() == 4
    q3, k3, v3 = (t[:, 0] for t in (q, k, v)) if one else (q, k, v)
    S, z = state
    out, S1, z1 = linear_attention_step_ref(q3, k3, v3, S, z, feature_map,
                                            q.shape[-1] ** -0.5 if scale is None else scale, normalize, eps)
    return (out[:, None] if one else out), (S1, z1)
