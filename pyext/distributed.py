"""kxops.distributed: context-parallel linear attention, one sequence split in rank order over a process group.

Without decay the linear-attention state is a plain sum, S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j)
(with RoPE, S sums the rotated phi(k_j)), so the state a rank starts from is the sum of the states of
the ranks before it. Per call and rank:

- forward: 1. one all_gather of a fixed 512-byte header (shapes, dtype, options, sequence length,
  whether the rank's own arguments were valid): every rank checks the same facts and raises the same
  error, so a bad argument on one rank is an error everywhere, never a hang; the lengths give each rank
  its global RoPE positions. 2. the rank's own state, a reduction phi(k)^T v (one batched matrix
  product), rank 0 adding initial_state to it. 3. one all_gather of the states, then a local exclusive
  prefix sum in rank order (every rank sums the same tensors in the same order, so the global final
  state is bitwise identical on every rank). 4. the local kernel, kxops.linear_attention, from that
  initial state.
- backward: one all_gather of the gradients of the initial states (and of the final state when some
  rank asked for it); each rank owes its state the sum over the ranks after it (the reverse exclusive
  prefix sum) plus the final state's gradients.
- global form (causal=False): every rank needs the sum over all ranks: one all_reduce each way.

Why all_gather and a local scan, not a scan of messages: one collective, one latency, however many
ranks; a ring or tree scan takes W - 1 or log2 W dependent steps. The price is volume: a rank receives
W - 1 states instead of one, B * H * F * (Dv + 1) * 4 bytes each, which at B2 H16 D128 is 2.1 MB per
rank: small beside the activations, and independent of the sequence length (benchmarks/
linear_attention_distributed.py measures it).

The collectives run on torch.distributed (gloo on CPU, NCCL on GPUs) and wait with a timeout: the
`timeout` argument, else the process group's own.
"""
from __future__ import annotations

import datetime
import math
import struct
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .linear_attention import _split_state
from .linear_attention import linear_attention as _local
from .reference.linear_attention import FEATURE_MAPS, feature, feature_size

__all__ = ["linear_attention", "communication_stats"]

_WHAT = "kxops.distributed.linear_attention"
_HEADER_BYTES = 512
# (name, struct format) of the header's fields, in order; the rest of the header is the rank's error text
_FIELDS = (("error", "d"), ("batch", "d"), ("heads", "d"), ("Dk", "d"), ("Dv", "d"), ("seq", "d"),
           ("dtype", "d"), ("device type", "d"), ("causal", "d"), ("feature_map", "d"), ("normalize", "d"),
           ("eps", "d"), ("scale", "d"), ("rope", "d"), ("rope_base", "d"), ("interleaved", "d"),
           ("positions given", "d"), ("needs grad", "d"), ("final state", "d"))
_HEADER = struct.Struct("<" + "".join(f for _, f in _FIELDS))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")
# what must agree on every rank (the sequence length, whether a gradient is needed and the final state
# may differ)
_MUST_AGREE = ("batch", "heads", "Dk", "Dv", "dtype", "device type", "causal", "feature_map", "normalize", "eps",
               "scale", "rope", "rope_base", "interleaved", "positions given")

_STATS = {"collectives": 0, "sent_bytes": 0, "received_bytes": 0}


def communication_stats(reset: bool = False) -> dict:
    """What this process's calls handed to collectives since the last reset: {"collectives",
    "sent_bytes", "received_bytes"}. An all_gather counts the bytes of the rank's own contribution as
    sent and the other ranks' contributions as received (what any all_gather algorithm must deliver;
    a ring sends each chunk on, so the wire carries up to W - 1 times more)."""
    out = dict(_STATS)
    if reset:
        for key in _STATS:
            _STATS[key] = 0
    return out


# ----------------------------------------------------------------------------------------------
# Collectives.

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13


def _seconds(timeout) -> Optional[float]:
    if timeout is None:
        return None
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)


def _finish(work, ctx: "_Comm", what: str, nbytes: int, received: int):
    try:
        if ctx.timeout is None:
            work.wait()
        else:
            work.wait(datetime.timedelta(seconds=ctx.timeout))
    except RuntimeError as e:
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        raise TimeoutError(
            f"{_WHAT}: the collective of {what} timed out on rank {ctx.rank} of {ctx.world}: every rank of the "
            f"group must make the call (and run its backward) together") from e
    _STATS["collectives"] += 1
    _STATS["sent_bytes"] += nbytes
    _STATS["received_bytes"] += received


def _all_gather(buf: Tensor, ctx: "_Comm", what: str) -> Tensor:
    """(world, *buf.shape): every rank's buf, in rank order."""
    buf = buf.contiguous()
    out = buf.new_empty(ctx.world * buf.numel())  # the concatenation (gloo takes no stacked output)
    work = _all_gather_single(out, buf.reshape(-1), group=ctx.group, async_op=True)
    nbytes = buf.numel() * buf.element_size()
    _finish(work, ctx, what, nbytes, nbytes * (ctx.world - 1))
    return out.view(ctx.world, *buf.shape)


def _all_reduce(buf: Tensor, ctx: "_Comm", what: str) -> Tensor:
    """The sum of every rank's buf (the same bits on every rank: each element is reduced once)."""
    out = buf.contiguous().clone()
    work = dist.all_reduce(out, group=ctx.group, async_op=True)
    nbytes = out.numel() * out.element_size()
    _finish(work, ctx, what, nbytes, nbytes)
    return out


class _Comm:
    """The group, this process's place in it, the device the collectives use and the timeout."""

    def __init__(self, group, timeout, data_device: Optional[torch.device]):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{_WHAT}: torch.distributed is not initialised (call init_process_group first)")
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError(f"{_WHAT}: this process (global rank {dist.get_rank()}) is not a member of `group`")
        self.world = dist.get_world_size(self.group)
        self.timeout = _seconds(timeout)
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"{_WHAT}: timeout must be positive, got {timeout!r}")
        backend = str(dist.get_backend(self.group)).lower()
        if "nccl" in backend and not (data_device is not None and data_device.type == "cpu" and "gloo" in backend):
            # NCCL moves CUDA tensors only (the header too): the data's GPU, else the current one
            self.device = (data_device if data_device is not None and data_device.type == "cuda"
                           else torch.device("cuda", torch.cuda.current_device()))
        else:
            self.device = torch.device("cpu") if data_device is None or "gloo" in backend else data_device


# ----------------------------------------------------------------------------------------------
# The header: one all_gather that makes every rank agree before any state moves.

def _code(value, table) -> float:
    return float(table.index(value)) if value in table else -1.0


def _header(ok: bool, q, v, T: int, causal, feature_map, normalize, eps, scale, rope, rope_base, interleaved,
            positions, needs_grad, final, error: str) -> Tensor:
    if ok:
        B, _, H, Dk = q.shape
        vals = (0.0, B, H, Dk, v.shape[-1], T, _code(q.dtype, _DTYPES), _code(q.device.type, _DEVICE_TYPES),
                bool(causal), _code(feature_map, FEATURE_MAPS), bool(normalize), float(eps),
                math.nan if scale is None else float(scale), bool(rope), float(rope_base), bool(interleaved),
                positions is not None, needs_grad, bool(final))
    else:
        vals = (1.0,) + (0.0,) * (len(_FIELDS) - 1)
    head = _HEADER.pack(*(float(x) for x in vals))
    text = error.encode("utf-8")[:_HEADER_BYTES - _HEADER.size]
    raw = head + text + bytes(_HEADER_BYTES - len(head) - len(text))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _read_headers(gathered: Tensor) -> list:
    out = []
    for row in gathered.cpu():
        raw = bytes(row.tolist())
        fields = dict(zip((n for n, _ in _FIELDS), _HEADER.unpack(raw[:_HEADER.size])))
        fields["text"] = raw[_HEADER.size:].rstrip(b"\0").decode("utf-8", "replace")
        out.append(fields)
    return out


def _show(name: str, value: float):
    if name == "dtype":
        return str(_DTYPES[int(value)]).replace("torch.", "") if value >= 0 else "?"
    if name == "device type":
        return _DEVICE_TYPES[int(value)] if value >= 0 else "?"
    if name == "feature_map":
        return FEATURE_MAPS[int(value)] if value >= 0 else "?"
    if name == "scale" and math.isnan(value):
        return None
    if name in ("causal", "normalize", "rope", "interleaved", "positions given"):
        return bool(value)
    return int(value) if float(value).is_integer() and name not in ("eps", "rope_base", "scale") else value


def _agree(headers: list):
    """The same error on every rank: the first rank that rejected its own arguments, else the first
    option or size that differs across ranks."""
    for r, h in enumerate(headers):
        if h["error"]:
            kind, _, text = h["text"].partition(": ")
            exc = {"TypeError": TypeError, "ValueError": ValueError}.get(kind, RuntimeError)
            raise exc(f"{_WHAT}: rank {r} of the group rejected its arguments: {text}")
    for name in _MUST_AGREE:
        vals = [h[name] for h in headers]
        same = all(v == vals[0] or (isinstance(v, float) and math.isnan(v) and math.isnan(vals[0])) for v in vals)
        if not same:
            raise ValueError(f"{_WHAT}: {name} differs across the ranks of the group (by rank: "
                             f"{[_show(name, v) for v in vals]}); every rank must pass its piece of one sequence "
                             "with the same options")


def _check_local(q, k, v, rank, initial_state, positions, common: dict):
    """The rank's own arguments, checked by the kernel's front on zero-length pieces (every check it
    makes, at no cost), before any collective: an error here is sent to every rank in the header."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, D), got shape {tuple(t.shape)}")
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(f"q, k, v must have the same sequence length, got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}")
    pos0 = None
    if positions is not None:
        if not isinstance(positions, Tensor):
            raise TypeError(f"positions must be a tensor or None, got {type(positions).__name__}")
        if positions.dim() not in (1, 2) or positions.shape[-1] != q.shape[1]:
            raise ValueError(f"positions must be (seq,) or (batch or 1, seq) with seq = {q.shape[1]} (this rank's "
                             f"piece), got shape {tuple(positions.shape)}")
        pos0 = positions[..., :0]
    with torch.no_grad():
        _local(q[:, :0], k[:, :0], v[:, :0], initial_state=initial_state if rank == 0 else None, positions=pos0,
               **common)


# ----------------------------------------------------------------------------------------------
# The state exchange, differentiable.

class _StatePrefix(torch.autograd.Function):
    """C (n,): this rank's state contribution (its own state; rank 0's includes initial_state) ->
    (P (n,): the sum over the ranks before this one (causal) or over the other ranks (global),
     F (n,): the sum over every rank, the same bits on each).
    Causal: one all_gather, then a prefix sum in rank order (the same additions on every rank).
    Global: one all_reduce (a ring moves 2 (W - 1) / W states per rank, where an all_gather delivers
    W - 1), P = F - C: the cancellation costs about one rounding of F, as the sum itself does.
    The gradient a rank feeds into F is summed over ranks, as for any value every rank holds
    (torch.distributed.nn's all_reduce does the same)."""

    @staticmethod
    def forward(ctx, C, _grad_anchor, comm: _Comm, causal: bool, with_final: bool):
        ctx.comm, ctx.causal, ctx.with_final = comm, causal, with_final
        ctx.data_device = C.device
        if not causal:
            F = _all_reduce(C.detach().to(comm.device), comm, "the states").to(C.device)
            return F - C.detach(), F
        total = _all_gather(C.detach().to(comm.device), comm, "the states").to(C.device).cumsum(0)
        r = comm.rank
        return (total[r - 1].clone() if r > 0 else torch.zeros_like(C)), total[-1].clone()

    @staticmethod
    def backward(ctx, dP, dF):  # (autograd passes zeros for an output without a gradient)
        comm, r = ctx.comm, ctx.comm.rank
        if not ctx.causal:  # P_r = F - C_r, F = sum_s C_s
            dF_all = _all_reduce((dP + dF).to(comm.device), comm, "the state gradients").to(ctx.data_device)
            return dF_all - dP, None, None, None, None
        parts = torch.stack((dP, dF)) if ctx.with_final else dP[None]
        g = _all_gather(parts.to(comm.device), comm, "the state gradients").to(ctx.data_device)
        dC = g[r + 1:, 0].sum(0) if r + 1 < comm.world else torch.zeros_like(dP)  # the ranks after this one
        if ctx.with_final:
            dC = dC + g[:, 1].sum(0)
        return dC, None, None, None, None


# ----------------------------------------------------------------------------------------------
# The public function.

class _Feature(torch.autograd.Function):
    """phi(x) for the elementwise maps, with a one-pass backward from the saved output (elu's own
    backward recomputes exp)."""

    @staticmethod
    def forward(ctx, x, feature_map: str):
        y = feature(x, feature_map)
        ctx.feature_map = feature_map
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, y = ctx.saved_tensors
        if ctx.feature_map == "identity":
            return g, None
        pos = x > 0
        if ctx.feature_map == "elu1":  # d/dx (elu(x) + 1) = 1 for x > 0, exp(x) = phi(x) below
            return torch.where(pos, g, g * y), None
        return torch.where(pos, g, torch.zeros_like(g)), None  # relu


class _StateProduct(torch.autograd.Function):
    """S[b, h] = rk[b, :, h]^T v[b, :, h] for rk (B, T, H, F), v (B, T, H, Dv): one batched matrix
    product per batch row over strided views, gradients written (B, H, T, .) and returned as
    (B, T, H, .) views: no copies."""

    @staticmethod
    def forward(ctx, rk, v):
        ctx.save_for_backward(rk, v)
        B, _, H, F = rk.shape
        S = rk.new_empty(B, H, F, v.shape[-1])
        for b in range(B):
            torch.bmm(rk[b].permute(1, 2, 0), v[b].permute(1, 0, 2), out=S[b])
        return S

    @staticmethod
    def backward(ctx, dS):
        rk, v = ctx.saved_tensors
        B, T, H, F = rk.shape
        drk = dv = None
        if ctx.needs_input_grad[0]:
            drk = rk.new_empty(B, H, T, F)
            for b in range(B):
                torch.bmm(v[b].permute(1, 0, 2), dS[b].transpose(1, 2), out=drk[b])
            drk = drk.permute(0, 2, 1, 3)
        if ctx.needs_input_grad[1]:
            dv = v.new_empty(B, H, T, v.shape[-1])
            for b in range(B):
                torch.bmm(rk[b].permute(1, 0, 2), dS[b], out=dv[b])
            dv = dv.permute(0, 2, 1, 3)
        return drk, dv


def _local_state(k: Tensor, v: Tensor, feature_map: str, rope: bool, rope_base: float, positions: Optional[Tensor],
                 offset: int, interleaved: bool, acc: torch.dtype):
    """This piece's own state (S (B, H, F, Dv), z (B, H, F)) in the state dtype, differentiable: phi(k)^T v
    (S from the RoPE-rotated features when rope is on, z from the plain ones), as the reference defines
    them; the rotation is kxops.rope's (the same angles as the kernels'), the products one batched matrix
    product per batch row over strided views (no copies)."""
    ka = k.to(acc)
    fk = feature(ka, feature_map) if feature_map == "taylor" else _Feature.apply(ka, feature_map)
    rk = fk
    if rope:
        from .rope import rope as _rope
        rot = dict(positions=positions, base=rope_base, interleaved=interleaved)
        if positions is None:
            rot["offsets"] = offset
        if feature_map == "taylor":  # the leading constant feature is not rotated
            rk = torch.cat((fk[..., :1], _rope(fk[..., 1:], **rot)), -1)
        else:
            rk = _rope(fk, **rot)
    return _StateProduct.apply(rk, v.to(acc)), fk.sum(1)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, timeout: Union[float, datetime.timedelta,
                     None] = None, causal: bool = True, feature_map: str = "elu1", normalize: bool = True,
                     eps: float = 1e-6, scale: Optional[float] = None, initial_state=None,
                     output_final_state: bool = False, rope: bool = False, rope_base: float = 10000.0,
                     positions: Optional[Tensor] = None, interleaved: bool = False, backend: str = "auto"):
    """Context-parallel kxops.linear_attention: q, k (batch, seq_local, heads, Dk), v (batch, seq_local,
    heads, Dv) are this rank's piece of one sequence split in rank order over `group` (default: the
    world); pieces may differ in length, 0 included. Every rank of the group must call it together
    (and, when training, run the backward together), as with any collective.

    Returns this rank's piece of kxops.linear_attention over the whole sequence, and with
    output_final_state=True also the state after the whole sequence, (out, (S, z)), bitwise the same
    on every rank. The options are kxops.linear_attention's; besides:
    initial_state: (S, z), the state before rank 0's piece: read on the group's first rank only (other
       ranks may pass None; what they pass is not read and gets no gradient), where it gets its whole
       gradient, as the source of torch.distributed.nn's broadcast does. A final state passed on as the
       next call's initial_state on every rank therefore chains calls, gradients included.
    The gradient each rank feeds into the final state is summed over the ranks.
    positions (RoPE): this piece's global positions; None: the global token index (the lengths of the
       ranks before this one, plus 0..).
    timeout: seconds (or a timedelta) each collective may wait; None: the process group's timeout.
    Bad arguments on any rank, or sizes and options that differ between ranks, raise the same error on
    every rank. Packed input (cu_seqlens) is not supported: one sequence (per batch row) is split.
    """
    data_device = q.device if isinstance(q, Tensor) else None
    comm = _Comm(group, timeout, data_device)
    common = dict(causal=causal, feature_map=feature_map, normalize=normalize, eps=eps, scale=scale, rope=rope,
                  rope_base=rope_base, interleaved=interleaved, backend=backend)
    init = initial_state if comm.rank == 0 else None
    S0, z0 = _split_state(init, f"{_WHAT}: initial_state") if init is not None else (None, None)
    try:
        _check_local(q, k, v, comm.rank, initial_state, positions, common)
        error = ""
    except Exception as e:  # sent to every rank; re-raised below with the others' view of it
        error = f"{type(e).__name__}: {e}"
    ok = not error
    needs_grad = ok and torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, S0, z0))
    head = _header(ok, q, v, q.shape[1] if ok else 0, causal, feature_map, normalize, eps, scale, rope, rope_base,
                   interleaved, positions, needs_grad, output_final_state, error)
    headers = _read_headers(_all_gather(head.to(comm.device), comm, "the argument header"))
    _agree(headers)

    B, T, H, Dk = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    offset = int(sum(h["seq"] for h in headers[:comm.rank]))
    pos = None
    if rope:
        pos = positions if positions is not None else torch.arange(offset, offset + T, device=q.device)
    S, z = _local_state(k, v, feature_map, rope, rope_base, positions, offset, interleaved, acc)
    Fs, Dv = feature_size(Dk, feature_map), v.shape[-1]
    C = torch.cat((S.reshape(-1), z.reshape(-1)))
    init_flat = None
    if S0 is not None:  # rank 0 starts from initial_state, and its contribution carries it to the others
        z0 = z0 if z0 is not None else S0.new_zeros(B, H, Fs)
        init_flat = torch.cat((S0.to(acc).reshape(-1), z0.to(acc).reshape(-1)))
        C = C + init_flat
    grad_any = any(h["needs grad"] for h in headers) and torch.is_grad_enabled()
    anchor = torch.zeros((), device=q.device, requires_grad=grad_any and not C.requires_grad)
    P, Fin = _StatePrefix.apply(C, anchor, comm, bool(causal), any(h["final state"] for h in headers))
    if init_flat is not None:
        P = P + init_flat
    nS = B * H * Fs * Dv
    out = _local(q, k, v, initial_state=(P[:nS].view(B, H, Fs, Dv), P[nS:].view(B, H, Fs)),
                 positions=pos if rope else positions, **common)
    if output_final_state:
        return out, (Fin[:nS].view(B, H, Fs, Dv), Fin[nS:].view(B, H, Fs))
    return out
