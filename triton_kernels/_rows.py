"""What the row-wise softmax families' Triton launchers share (triton_kernels/sparse_softmax.py,
gumbel_softmax.py): the dtypes they take, the (R, N) check and the choice between a row held on chip and a
row streamed in chunks."""
from __future__ import annotations

import torch

SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def pow2(n: int) -> int:
    """Smallest power of two >= n (plain Python)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def row_config(family: str, N, tuning: dict, block_cap=None, cap_key: str = "block_cap"):
    """(ONCHIP, BLOCK, num_warps) for rows of N under a family's TUNING (cap_key: its on-chip cap, overridden by
    block_cap; "warps": (block, warps) steps; "chunk", "chunk_warps": the chunked path). A symbolic N (tracing)
    takes the chunked path, right for any N."""
    cap = tuning[cap_key] if block_cap is None else int(block_cap)
    if cap < 16 or cap & (cap - 1):
        raise ValueError(f"{family} (triton): block_cap must be a power of two >= 16, got {cap}")
    if isinstance(N, int) and pow2(N) <= cap:
        block = max(16, pow2(N))
        warps = next(w for b, w in tuning["warps"] if b >= block)
        return True, block, warps
    return False, min(tuning["chunk"], cap), tuning["chunk_warps"]


def check_x(name: str, x: torch.Tensor) -> torch.Tensor:
    """x (R, N), N >= 1, float16 / bfloat16 / float32, made contiguous."""
    if x.dtype not in SUPPORTED:
        raise ValueError(f"{name} (triton): unsupported dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.dim() != 2:
        raise ValueError(f"{name} (triton): x must be (R, N)")
    if x.shape[1] < 1:
        raise ValueError(f"{name} (triton): rows must have N >= 1 entries")
    return x.contiguous()
