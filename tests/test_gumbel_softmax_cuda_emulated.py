"""The CUDA kernels of csrc/cuda/gumbel_softmax_cuda.cu (gumbel_softmax, gumbel_softmax_backward, gumbel_max,
perturb_max, perturb_max_backward), compiled for the host by tools/cuda_emulate.py, against the reference on the
kernel contract's normalised arguments (docs/gumbel_softmax_kernel_contract.md; pyext/reference/gumbel_softmax.py).

y, soft and dx are held to the project's rule max|out - ref64| <= 2 max|ref_lp - ref64| + floor (ref64: the
reference on float64 copies with the same seed, so with float64 noise; ref_lp: in the test dtype, float32
noise as the kernels draw it); the sample index must equal the reference's (ref_lp: the same float32 v) exactly,
and a hard y must be the exact one-hot. Perturb-max computes in float64 whatever the dtype: on float64 inputs
(which the CUDA op accepts for perturb-max) p and dx must agree with the reference to 1e-10 relative.

Each kernel path runs at small sizes through the launch thresholds the .cu reads at every launch: "warp" (a
warp per row, v in registers: the default for N <= 1024), "block" (a block per row, v in registers:
KXOPS_GUMBEL_SOFTMAX_SHORT_N=0), "stream" (every quad in the tail: two reads of x, the noise regenerated:
KXOPS_GUMBEL_SOFTMAX_REG_QUADS=0, on both) and "mixed" (one quad a thread in registers, the rest in the tail);
within each, the vector path (aligned, 4 | N) and the scalar one (odd N, x at an odd offset).
On a GPU machine the real kernels are tested through the public API instead.
"""
import os
import sys

import pytest
import torch

from testing import HAS_CUDA, assert_close_to_ref, reference_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_emulate  # noqa: E402

ref = reference_module("gumbel_softmax")

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the real CUDA kernel is tested through kxops"),
    pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None, reason="CUDA headers not found (set CUDA_HOME)"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENV = ("KXOPS_GUMBEL_SOFTMAX_SHORT_N", "KXOPS_GUMBEL_SOFTMAX_REG_QUADS", "KXOPS_PERTURB_MAX_WORKSPACE_BYTES")
PATHS = {
    "warp": {},
    "warp-stream": {"KXOPS_GUMBEL_SOFTMAX_REG_QUADS": "0"},
    "warp-mixed": {"KXOPS_GUMBEL_SOFTMAX_REG_QUADS": "1"},
    "block": {"KXOPS_GUMBEL_SOFTMAX_SHORT_N": "0"},
    "block-stream": {"KXOPS_GUMBEL_SOFTMAX_SHORT_N": "0", "KXOPS_GUMBEL_SOFTMAX_REG_QUADS": "0"},
    "block-mixed": {"KXOPS_GUMBEL_SOFTMAX_SHORT_N": "0", "KXOPS_GUMBEL_SOFTMAX_REG_QUADS": "1"},
}
NINF = float("-inf")
SEEDS = [0x5DEECE66D, -0x7123456789ABCDEF, 2**63 - 1]  # the key's both halves, a negative int64


@pytest.fixture(scope="module")
def ops():
    return cuda_emulate.load("gumbel_softmax")


def use_path(monkeypatch, path):
    for k in ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in PATHS[path].items():
        monkeypatch.setenv(k, v)


def rows_for(N, seed=0):
    """(R, N) float32 rows: random (wide and narrow), every third entry -inf, one finite entry, all -inf,
    small integers (ties: without noise the first maximum must win), all equal."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(N, generator=g) * 3, torch.randn(N, generator=g) * 0.1]
    r = torch.randn(N, generator=g)
    r[1::3] = NINF
    rows.append(r)
    r = torch.full((N,), NINF)
    r[(N * 2) // 3] = -0.5
    rows.append(r)
    rows.append(torch.full((N,), NINF))
    rows.append(torch.randint(-2, 2, (N,), generator=g).float())
    rows.append(torch.full((N,), 0.25))
    return torch.stack(rows)


def seed_t(s):
    return torch.tensor([s], dtype=torch.int64)


def offset_copy(x):
    """x's values in a tensor one element off 16-byte alignment (the scalar loads and stores)."""
    R, N = x.shape
    out = torch.empty(R * N + 1, dtype=x.dtype)[1:].view(R, N)
    out.copy_(x)
    assert out.data_ptr() % 16 != 0
    return out


def check_forward(ops, x, seed, tau, hard):
    y, soft, index = ops.gumbel_softmax(x, seed, tau, hard)
    y64, s64, _ = ref.gumbel_softmax_ref(x.double(), seed, tau, hard)
    ylp, slp, ilp = ref.gumbel_softmax_ref(x, seed, tau, hard)
    what = f"N={x.shape[1]} {x.dtype} seed={None if seed is None else seed.item()} tau={tau} hard={hard}"
    assert index.dtype == torch.int64 and torch.equal(index, ilp), (what, index, ilp)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_to_ref(y, y64, ylp, f"y ({what})")
    if hard:
        assert torch.equal(y, ylp.detach()), f"hard y is not the exact one-hot ({what})"
        assert soft.dtype == x.dtype and soft.shape == x.shape
        assert_close_to_ref(soft, s64, slp, f"soft ({what})")
    else:
        assert soft.shape == (0,) and soft.dtype == x.dtype
    dead = (x.float() == NINF).all(1)
    assert (index[dead] == -1).all() and (y[dead] == 0).all()
    return soft if hard else y


def check_backward(ops, y, dy, tau):
    dx = ops.gumbel_softmax_backward(dy, y, tau)
    d64 = ref.gumbel_softmax_backward_ref(dy.double(), y.double(), tau)
    dlp = ref.gumbel_softmax_backward_ref(dy, y, tau)
    assert dx.dtype == y.dtype
    assert_close_to_ref(dx, d64, dlp, f"dx (N={y.shape[1]} {y.dtype} tau={tau})")
    assert (dx[(y.float() == 0).all(1)] == 0).all()


# ---- every path x dtype: soft / hard / no seed, three temperatures, the backward, gumbel_max ----

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("path", list(PATHS))
def test_paths(ops, monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    for n, N in enumerate((1, 3, 36, 130, 301)):
        x = rows_for(N, seed=N).to(dtype)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(N)).to(dtype)
        for tau, hard, seed in ((1.0, False, SEEDS[n % 3]), (1e-3, True, SEEDS[(n + 1) % 3]),
                                (1e3, False, SEEDS[(n + 2) % 3]), (1.0, True, None)):
            s = None if seed is None else seed_t(seed)
            y = check_forward(ops, x, s, tau, hard)
            check_backward(ops, y, dy, tau)
        s = seed_t(SEEDS[n % 3])
        assert torch.equal(ops.gumbel_max(x, s), ref.gumbel_max_ref(x, s))


@pytest.mark.parametrize("path", ["warp", "block", "block-stream", "block-mixed"])
def test_unaligned(ops, monkeypatch, path):
    """4 | N but x (y, soft; dy, y for the backward) one element off 16 bytes: the scalar loads and stores."""
    use_path(monkeypatch, path)
    for dtype in DTYPES.values():
        base = rows_for(64, seed=3).to(dtype)
        x = offset_copy(base)
        s = seed_t(SEEDS[1])
        y = check_forward(ops, x, s, 1.0, False)
        check_forward(ops, x, s, 0.5, True)
        assert torch.equal(ops.gumbel_max(x, s), ref.gumbel_max_ref(x, s))
        dy = offset_copy(torch.randn(base.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
        check_backward(ops, offset_copy(y), dy, 1.0)


@pytest.mark.parametrize("path,N", [
    ("warp", 1000),          # 8 quads a lane in registers
    ("block", 1500),         # the default block path: 128 threads, 3 quads each
    ("block-mixed", 2052),   # 128 threads, one quad each in registers, 385 quads in the tail
    ("block-stream", 1027),  # odd N: scalar, everything in the tail
])
def test_long_rows(ops, monkeypatch, path, N):
    use_path(monkeypatch, path)
    if path == "block":
        monkeypatch.delenv("KXOPS_GUMBEL_SOFTMAX_SHORT_N")
    g = torch.Generator().manual_seed(N)
    x = torch.randn(3, N, generator=g) * 2
    x[1, 5::4] = NINF
    x[2] = NINF
    dy = torch.randn(3, N, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        y = check_forward(ops, xd, seed_t(SEEDS[0]), 1.0, False)
        check_backward(ops, y, dy.to(dtype), 1.0)
        check_forward(ops, xd, seed_t(SEEDS[2]), 1e-3, True)


@pytest.mark.parametrize("path", ["warp", "block", "block-mixed"])
def test_grid_stride(ops, monkeypatch, path):
    """More rows than blocks (KXOPS_EMU_GRID_CAP=1): every block walks the row loop, dead rows between live ones."""
    use_path(monkeypatch, path)
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "1")
    x = torch.cat([rows_for(40, seed=s) for s in range(3)])[:19 if path == "warp" else 9]
    s = seed_t(SEEDS[0])
    y = check_forward(ops, x, s, 1.0, False)
    check_forward(ops, x, s, 2.0, True)
    check_backward(ops, y, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), 2.0)
    assert torch.equal(ops.gumbel_max(x, s), ref.gumbel_max_ref(x, s))


def test_noise_bits(ops):
    """tau = 1 and x = 0: y is the softmax of the noise alone, and with no seed y is uniform."""
    x = torch.zeros(3, 10)
    y, _, _ = ops.gumbel_softmax(x, seed_t(7), 1.0, False)
    g = ref.gumbel_noise(seed_t(7), 3, 10, torch.float32)
    torch.testing.assert_close(y, torch.softmax(g, 1), rtol=1e-6, atol=1e-7)
    y, _, index = ops.gumbel_softmax(x, None, 1.0, False)
    assert torch.equal(y, torch.full_like(y, 0.1)) and (index == 0).all()


def test_empty(ops):
    y, soft, index = ops.gumbel_softmax(torch.empty(0, 5), seed_t(1), 1.0, True)
    assert y.shape == (0, 5) and soft.shape == (0, 5) and index.shape == (0,)
    assert ops.gumbel_max(torch.empty(0, 5), seed_t(1)).shape == (0,)
    assert ops.gumbel_softmax_backward(torch.empty(0, 5), torch.empty(0, 5), 1.0).shape == (0, 5)
    assert ops.perturb_max(torch.empty(0, 5), ref.perturb_max_nodes(4)).shape == (0, 5)


def test_bad_inputs(ops):
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="seed"):
        ops.gumbel_softmax(x, torch.tensor([1, 2]), 1.0, False)
    with pytest.raises(RuntimeError, match="tau"):
        ops.gumbel_softmax(x, seed_t(1), 0.0, False)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.gumbel_max(x.double(), seed_t(1))
    with pytest.raises(RuntimeError, match="nodes"):
        ops.perturb_max(x, ref.perturb_max_nodes(4).float())


# ---- perturb-max (float64 inside) ----

def perturb_rows(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(N, generator=g) * 2, torch.randn(N, generator=g) * 0.2, torch.randn(N, generator=g) * 12]
    r = torch.randn(N, generator=g)
    r[1::3] = NINF
    rows.append(r)
    r = torch.full((N,), NINF)
    r[N // 2] = 1.5
    rows.append(r)
    rows.append(torch.full((N,), NINF))
    rows.append(torch.full((N,), 0.5))
    return torch.stack(rows).double()


@pytest.mark.parametrize("N,K", [(1, 2), (2, 5), (7, 33), (37, 8)])
def test_perturb_max_float64(ops, monkeypatch, N, K):
    """p and dx to 1e-10 relative; the backward's workspace in chunks of one row, then two, then all."""
    x = perturb_rows(N, seed=N)
    nodes = ref.perturb_max_nodes(K)
    p = ops.perturb_max(x, nodes)
    want = ref.perturb_max_ref(x, nodes)
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, want, rtol=1e-10, atol=1e-14)
    dp = torch.randn(x.shape, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    want = ref.perturb_max_backward_ref(dp, x, nodes)
    for ws in (1, 2 * N * K * 8, None):
        monkeypatch.delenv("KXOPS_PERTURB_MAX_WORKSPACE_BYTES", raising=False)
        if ws is not None:
            monkeypatch.setenv("KXOPS_PERTURB_MAX_WORKSPACE_BYTES", str(ws))
        dx = ops.perturb_max_backward(dp, x, nodes)
        torch.testing.assert_close(dx, want, rtol=1e-10, atol=1e-10 * want.abs().max().item() + 1e-300)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_perturb_max_dtypes(ops, dtype):
    x = perturb_rows(12, seed=1).to(dtype)
    nodes = ref.perturb_max_nodes(16)
    p = ops.perturb_max(x, nodes)
    assert p.dtype == dtype
    assert_close_to_ref(p, ref.perturb_max_ref(x.double(), nodes), ref.perturb_max_ref(x, nodes), "p")
    dp = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dx = ops.perturb_max_backward(dp, x, nodes)
    assert dx.dtype == dtype
    assert_close_to_ref(dx, ref.perturb_max_backward_ref(dp.double(), x.double(), nodes),
                        ref.perturb_max_backward_ref(dp, x, nodes), "dx")
