"""Compiles every family's Triton kernels for a GPU architecture without a GPU (Triton's own compiler and
ptxas; nothing runs): the code path the interpreter does not take (tl.dot lowering, layouts, shared
memory, register allocation) fails here, in CI, instead of on the first GPU machine.

    python tools/check_triton.py [--arch 90]

How: the launchers run on CPU tensors with torch.library.wrap_triton replaced by a recorder (they launch
through it when traceable=True), so each launch's kernel, arguments and constexprs are captured and
compiled with triton.compile(ASTSource, GPUTarget("cuda", arch, 32)). The configurations below cover the
kernels' dtype, feature-map, RoPE, causal/global, normalisation, segment and step variants. Prints one line
per distinct compilation (time, shared memory); exits 1 on the first failure. Must run without
TRITON_INTERPRET (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("check_triton: unset TRITON_INTERPRET (the interpreter replaces the kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import kxops  # noqa: E402,F401  (the package's triton_kernels)
from kxops.triton_kernels import global_pointer as gp  # noqa: E402
from kxops.triton_kernels import gumbel_softmax as gs  # noqa: E402
from kxops.triton_kernels import linear_attention as la  # noqa: E402
from kxops.triton_kernels import rope  # noqa: E402
from kxops.triton_kernels import sparse_softmax as ss  # noqa: E402

_RECORDS: list = []


class _Recorder:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kw: _RECORDS.append((self.kernel, args, kw))


_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def _signature(kernel, args, kw):
    """ASTSource's signature and constexprs, and the compile options, of one recorded launch."""
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
    constexpr = {p.name for p in kernel.params if p.is_constexpr}
    sig, consts, pos = {}, {}, iter(args)
    for i, name in enumerate(kernel.arg_names):
        a = kw[name] if name in constexpr else next(pos)
        if name in constexpr or a is None:
            sig[name] = "constexpr"
            consts[(i,)] = a
        elif isinstance(a, torch.Tensor):
            sig[name] = "*" + _TYPES[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i64" if not -2**31 <= a < 2**31 else "i32"
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {name} of type {type(a).__name__}")
    return sig, consts, options


def _linear_attention():
    r = torch.randn
    for dtype, fm, rope_mode, causal, normalize, Dk, Dv, segments in [
            (torch.bfloat16, 0, 0, True, False, 128, 128, 1),   # FLA's benchmark form: identity, raw
            (torch.bfloat16, 1, 0, True, True, 128, 128, 2),    # elu1, normalised, segments
            (torch.float16, 3, 1, True, True, 64, 64, 2),       # taylor, RoPE half
            (torch.float32, 1, 2, False, True, 128, 96, 1),     # float32 (float64 compute), global, RoPE pairs
            (torch.bfloat16, 2, 0, True, True, 256, 256, 2)]:   # the largest head dims, Dv blocks
        la.TUNING["segments"] = segments
        B, T, H = 1, 256, 2
        q, k, v = r(B, T, H, Dk).to(dtype), r(B, T, H, Dk).to(dtype), r(B, T, H, Dv).to(dtype)
        F = Dk + (fm == 3)
        inv = (1.0 / 10000 ** (torch.arange(0, Dk, 2) / Dk)).float() if rope_mode else None
        pos = torch.arange(T).expand(B, T) if rope_mode == 2 else None
        S0, z0 = torch.zeros(B, H, F, Dv), torch.zeros(B, H, F)
        args = (None, pos, inv, rope_mode == 2, fm, Dk ** -0.5, normalize, 1e-6, causal)
        la.linear_attention_fwd(q, k, v, S0, z0, *args, torch.empty(B, T, H, Dv, dtype=dtype),
                                torch.empty(B, H, F, Dv), torch.empty(B, H, F))
        la.linear_attention_bwd(torch.randn_like(v), torch.zeros(B, H, F, Dv), torch.zeros(B, H, F), q, k, v, S0, z0,
                                *args, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                                torch.empty(B, H, F, Dv), torch.empty(B, H, F))
    la.TUNING["segments"] = None
    for dtype, fm, Dk, Dv in [(torch.bfloat16, 1, 64, 64), (torch.float32, 3, 128, 128)]:
        q, v = r(4, 2, Dk).to(dtype), r(4, 2, Dv).to(dtype)
        F = Dk + (fm == 3)
        la.linear_attention_step(q, q, v, torch.zeros(4, 2, F, Dv), torch.zeros(4, 2, F), fm, 0.125, True, 1e-6,
                                 torch.empty(4, 2, Dv, dtype=dtype), torch.empty(4, 2, F, Dv), torch.empty(4, 2, F))


def _rope():
    inv = (1.0 / 10000 ** (torch.arange(0, 64, 2) / 64)).float()
    for dtype, interleaved in [(torch.bfloat16, False), (torch.float32, True)]:
        q, k = torch.randn(2, 16, 4, 64).to(dtype), torch.randn(2, 16, 2, 64).to(dtype)
        rope.rope_launch(q, torch.empty_like(q), k, torch.empty_like(k), None, None, 0, None, inv, None, 64,
                         interleaved, False, False)


def _global_pointer():
    B, L = 2, 128
    for dtype, Hq, H, d, rope_on, dense, start, end, masked, tril in [
            (torch.float32, 1, 3, 64, True, False, True, True, True, True),      # Efficient GP: shared q/k, biases
            (torch.bfloat16, 4, 4, 128, True, True, False, False, True, True),   # GP, dense labels
            (torch.float16, 2, 2, 256, False, False, True, False, False, False),  # the largest head, no RoPE
            (torch.bfloat16, 1, 2, 6, True, True, False, True, True, False),     # d/2 padded to 16
            (torch.float32, 2, 2, 128, False, False, False, False, False, True)]:
        x = torch.randn(B, L, Hq, 2 * d).to(dtype)
        q, k = x[..., :d], x[..., d:]  # strided q / k
        mask = torch.ones(B, L, dtype=torch.bool) if masked else None
        sb = torch.randn(B, H, L) if start else None
        eb = torch.randn(B, H, L) if end else None
        inv = (1.0 / 10000 ** (torch.arange(0, d, 2) / d)).float() if rope_on else None
        if dense:
            labels = (None, None, torch.rand(B, H, L, L))
        else:
            labels = (torch.arange(B * H + 1, dtype=torch.int32) * 2, torch.arange(2 * B * H, dtype=torch.int32), None)
        args = (q, k, mask, sb, eb, inv, H, d ** -0.5, tril, *labels)
        gp.loss_forward(*args)
        gp.loss_backward(torch.randn(B, H), *args, torch.zeros(B, H), torch.zeros(B, H))
        # the span logits and decoding: the same kernels in their scores modes
        score_args = args[:9]
        gp.logits_forward(*score_args)
        gp.logits_backward(torch.randn(B, H, L, L), *score_args)
        gp.decode(*score_args, 0.0)  # records the count pass (nothing runs: no hit, so no write pass)
        n = 8
        gp._launch_scores(gp._Args(*score_args, labels=False), "write", torch.empty(n), torch.zeros(B * H * L,
                          dtype=torch.int64), torch.empty(n, 4, dtype=torch.int64), 0.0, True, n)
    # the row losses: dense / sparse labels, mask_zero
    R = 64
    for dtype, C, P, dense, mask_zero in [(torch.float32, 1000, 0, True, False), (torch.bfloat16, 300, 7, False, True),
                                          (torch.float16, 50, 3, False, False)]:
        x = torch.randn(R, C).to(dtype)
        labels = (torch.rand(R, C), None) if dense else (None, torch.randint(0, C, (R, P)))
        gp.mlce_forward(x, *labels, mask_zero)
        gp.mlce_backward(torch.randn(R), x, *labels, mask_zero, torch.zeros(R), torch.zeros(R))


def _sparse_softmax():
    """entmax (kinds 0, 1 with and without a loss, kind 2), top-k softmax (with and without a loss) and the backward
    (kinds 0-3, kind 2 with and without alpha_grad) in every dtype, on chip at 4096 x 512 and at the largest
    on-chip block (block_cap), and chunked (131072-wide rows)."""
    R = 4
    cap = ss.TUNING["block_cap"]
    widths = [(512, None), (cap, None), (131072, None)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for N, bc in widths:
            x = torch.randn(R, N).to(dtype)
            alpha = torch.full((R,), 1.5)
            target = torch.zeros(R, dtype=torch.int64)
            for kind in (0, 1):
                ss.entmax_forward(x, None, kind, 50, target, -100, block_cap=bc)
                ss.entmax_forward(x, None, kind, 50, None, -100, block_cap=bc)
            ss.entmax_forward(x, alpha, 2, 50, None, -100, block_cap=bc)
            ss.topk_softmax_forward(x, 5, target, -100, block_cap=bc)
            ss.topk_softmax_forward(x, 5, None, -100, block_cap=bc)
            for kind in (0, 1, 3):
                ss.entmax_backward(x, x, None, kind, False, block_cap=bc)
            ss.entmax_backward(x, x, alpha, 2, True, block_cap=bc)
            ss.entmax_backward(x, x, alpha, 2, False, block_cap=bc)


def _gumbel_softmax():
    """Gumbel-softmax (soft / hard, with and without noise), Gumbel-max and the backward in fp32 and bf16, on chip
    at 512 and at the largest on-chip block (block_cap, bwd_block_cap), and chunked (131072-wide rows); fp16
    (bf16's code with another load and store type) at 512; the perturb-max forward and backward in every dtype."""
    R = 4
    seed = torch.tensor([1234], dtype=torch.int64)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        big = dtype != torch.float16
        fwd_widths = [512] + ([gs.TUNING["block_cap"], 131072] if big else [])
        bwd_widths = [512] + ([gs.TUNING["bwd_block_cap"], 131072] if big else [])
        for N in fwd_widths:
            x = torch.randn(R, N).to(dtype)
            for noise in (seed, None):
                for hard in (False, True):
                    gs.gumbel_softmax_forward(x, noise, 0.5, hard)
            gs.gumbel_max_forward(x, seed)
        for N in bwd_widths:
            y = torch.rand(R, N).to(dtype)
            gs.gumbel_softmax_backward(torch.randn(R, N).to(dtype), y, 0.5)
        x = torch.randn(R, 300).to(dtype)
        nodes = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
        gs.perturb_max_forward(x, nodes)
        gs.perturb_max_backward(torch.randn(R, 300).to(dtype), x, nodes)


FAMILIES = {"linear_attention": _linear_attention, "rope": _rope, "global_pointer": _global_pointer,
            "sparse_softmax": _sparse_softmax, "gumbel_softmax": _gumbel_softmax}


_JOBS: list = []


def _compile(i, arch):
    """(seconds, shared memory, error or None) of compiling job i for sm_<arch>."""
    kernel, sig, consts, options = _JOBS[i]
    t = time.time()
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # noqa: BLE001
        return time.time() - t, 0, f"{type(e).__name__}: {e}"
    return time.time() - t, compiled.metadata.shared, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 90 (default 90)")
    ap.add_argument("--family", action="append", help="only these families (default: all)")
    a = ap.parse_args(argv)
    torch.library.wrap_triton = _Recorder
    for name in a.family or FAMILIES:
        FAMILIES[name]()
    seen, jobs, t0 = set(), [], time.time()
    for kernel, args, kw in _RECORDS:
        sig, consts, options = _signature(kernel, list(args), dict(kw))
        key = (kernel.__name__, repr(sorted(sig.items())), repr(sorted(consts.items(), key=str)), repr(options))
        if key not in seen:
            seen.add(key)
            jobs.append((kernel, sig, consts, options))
    _JOBS[:] = jobs
    # the compilations are independent: one process per core (forked, so they inherit the recorded jobs)
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=mp.get_context("fork")) as pool:
        for i, (dt, shared, error) in enumerate(pool.map(_compile, range(len(jobs)), [a.arch] * len(jobs))):
            kernel, sig, consts, options = jobs[i]
            if error is not None:
                print(f"check_triton: {kernel.__name__} failed for sm_{a.arch}: {error}\n"
                      f"  signature {sig}\n  constexprs {consts}\n  options {options}", file=sys.stderr)
                return 1
            print(f"{kernel.__name__:26s} {dt:5.1f} s  shared {shared} B")
    print(f"check_triton: {len(seen)} compilations for sm_{a.arch} in {time.time() - t0:.0f} s (triton "
          f"{triton.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
