"""The CUDA kernels of csrc/cuda/sparse_softmax_cuda.cu (entmax, entmax_backward, topk_softmax), compiled for
the host by tools/cuda_emulate.py, against the reference on the kernel contract's normalised arguments
(docs/sparse_softmax_kernel_contract.md; pyext/reference/sparse_softmax.py: entmax_ref, topk_softmax_ref,
entmax_backward_ref).

Held to the project's rule max|out - ref64| <= 2 max|ref_lp - ref64| + floor (ref64: the reference on float64
copies, ref_lp: in the test dtype) for p, loss, dx and dalpha; +inf losses (all -inf rows, a -inf target)
must match exactly. Each kernel path runs at small sizes by lowering the launch thresholds the .cu reads at
every launch: "warp" (a warp per row, the row in shared memory; the default for N <= 1024), "onchip" (a
block per row, the row in shared memory: KXOPS_SPARSE_SOFTMAX_SHORT_N=0) and "stream" (a block per row,
every pass from global memory: also KXOPS_SPARSE_SOFTMAX_ONCHIP_BYTES=0); within each, the 16-byte vector
path (aligned x, N a multiple of 16 bytes' entries) and the scalar one (odd N, or x at an odd offset).
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

ref = reference_module("sparse_softmax")

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the real CUDA kernel is tested through kxops"),
    pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None, reason="CUDA headers not found (set CUDA_HOME)"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PATHS = {
    "warp": {},
    "onchip": {"KXOPS_SPARSE_SOFTMAX_SHORT_N": "0"},
    "stream": {"KXOPS_SPARSE_SOFTMAX_SHORT_N": "0", "KXOPS_SPARSE_SOFTMAX_ONCHIP_BYTES": "0"},
}
IGNORE = -100
NINF = float("-inf")


@pytest.fixture(scope="module")
def ops():
    return cuda_emulate.load("sparse_softmax")


def use_path(monkeypatch, path):
    for k in ("KXOPS_SPARSE_SOFTMAX_SHORT_N", "KXOPS_SPARSE_SOFTMAX_ONCHIP_BYTES"):
        monkeypatch.delenv(k, raising=False)
    for k, v in PATHS[path].items():
        monkeypatch.setenv(k, v)


def rows_for(N, seed=0):
    """(R, N) float32 rows, every value exact in fp16 and bf16 where it matters (ties): random rows (narrow and
    wide supports), a row with every third entry -inf, one finite entry, all -inf twice (one ignored), a tie at
    the threshold (1, then 0 and -1.5 alternating: z = tau exactly for sparsemax and entmax15), small
    integers (ties everywhere, ties at the top-k value)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randn(N, generator=g) * 2, torch.randn(N, generator=g) * 0.3]
    r = torch.randn(N, generator=g)
    r[1::3] = NINF
    rows.append(r)
    r = torch.full((N,), NINF)
    r[N // 2] = 0.75
    rows.append(r)
    rows.append(torch.full((N,), NINF))
    rows.append(torch.full((N,), NINF))
    r = torch.zeros(N)
    r[0] = 1.0
    r[2::2] = -1.5
    rows.append(r)
    rows.append(torch.randint(-2, 2, (N,), generator=g).float())
    return torch.stack(rows)


def targets_for(x, seed=0):
    """A target per row: random; row 2 at a -inf entry (loss +inf) when it has one; row 5 (all -inf) ignored,
    row 4 (all -inf) not (+inf); row 0 ignored too."""
    R, N = x.shape
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, N, (R,), generator=g)
    if N >= 2:
        t[2] = 1
    t[0] = IGNORE
    t[5] = IGNORE
    return t


def assert_loss(out, r64, rlp, what="loss"):
    """The rule on the finite entries; +inf entries (and their places) exactly as the reference's."""
    assert out.dtype == torch.float32 and out.shape == r64.shape, what
    inf = torch.isinf(r64)
    assert torch.equal(torch.isinf(out), inf) and (out[inf] == r64[inf].float()).all(), (what, out, r64)
    fin = ~inf
    assert_close_to_ref(out[fin], r64[fin], rlp[fin], what)


def check_entmax(ops, x, kind, target=None, alpha=None, n_iter=50):
    p, loss = ops.entmax(x, alpha, kind, n_iter, target, IGNORE)
    p64, l64 = ref.entmax_ref(x.double(), alpha, kind, n_iter, target, IGNORE)
    plp, llp = ref.entmax_ref(x, alpha, kind, n_iter, target, IGNORE)
    assert p.dtype == x.dtype and p.is_contiguous()
    assert_close_to_ref(p, p64, plp, f"p (kind {kind})")
    if target is None:
        assert loss.dtype == torch.float32 and loss.shape == (0,)
    else:
        assert_loss(loss, l64, llp.float(), f"loss (kind {kind})")
    return p


def check_topk(ops, x, k, target=None):
    p, loss = ops.topk_softmax(x, k, target, IGNORE)
    p64, l64 = ref.topk_softmax_ref(x.double(), k, target, IGNORE)
    plp, llp = ref.topk_softmax_ref(x, k, target, IGNORE)
    assert p.dtype == x.dtype
    assert_close_to_ref(p, p64, plp, f"topk p (k {k})")
    # the selected set exactly: a stable descending sort's first k (the lowest indices win ties)
    sel = ref.topk_mask(x.float(), k)
    finite_max = x.float().amax(-1, keepdim=True) > NINF
    assert not ((p != 0) & ~sel).any(), "an entry outside the top-k set got mass"
    live = sel & finite_max & (x.float() > NINF)
    assert (p[live] > 0).all(), "a selected finite entry got p = 0"
    if target is None:
        assert loss.dtype == torch.float32 and loss.shape == (0,)
    else:
        assert_loss(loss, l64, llp.float(), f"topk loss (k {k})")
    return p


def check_backward(ops, p, dp, kind, alpha=None):
    ag = kind == 2
    dx, da = ops.entmax_backward(dp, p, alpha, kind, ag)
    d64, a64 = ref.entmax_backward_ref(dp.double(), p.double(), alpha, kind, ag)
    dlp, alp = ref.entmax_backward_ref(dp, p, alpha, kind, ag)
    assert dx.dtype == p.dtype
    assert_close_to_ref(dx, d64, dlp, f"dx (kind {kind})")
    dead = (p.float() == 0).all(-1)
    assert (dx[dead] == 0).all(), "an all -inf row (p = 0) must give dx = 0"
    if ag:
        assert da.dtype == torch.float32 and da.shape == (p.shape[0],)
        assert (da[dead] == 0).all()
        assert_close_to_ref(da, a64, alp.float(), "dalpha")
    else:
        assert da.shape == (0,)


ALPHAS = [1.25, 1.5, 2.0, 1.75, 3.0, 1.125, 1.5, 2.5]  # exact in bf16 / fp16


# ---- every path x dtype: all kinds, forward with and without the loss, and the backward ----

@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("path", list(PATHS))
def test_paths(ops, monkeypatch, path, dtype):
    use_path(monkeypatch, path)
    for N in (1, 2, 3, 37, 100, 128):
        x = rows_for(N, seed=N).to(dtype)
        t = targets_for(x, seed=N)
        R = x.shape[0]
        alpha = torch.tensor(ALPHAS[:R], dtype=torch.float32)
        dp = torch.randn(R, N, generator=torch.Generator().manual_seed(N + 7)).to(dtype)
        for kind in (0, 1):
            check_entmax(ops, x, kind, target=t)
            p = check_entmax(ops, x, kind)
            check_backward(ops, p, dp, kind)
        p = check_entmax(ops, x, 2, alpha=alpha)
        check_backward(ops, p, dp, 2, alpha)
        for k in sorted({1, (N + 2) // 3, N}):
            p = check_topk(ops, x, k, target=t if k != N else None)
        check_backward(ops, p, dp, 3)


@pytest.mark.parametrize("path", list(PATHS))
def test_unaligned_scalar_path(ops, monkeypatch, path):
    """N a multiple of the vector width but x (and dp, p) one element off 16 bytes: the scalar loads."""
    use_path(monkeypatch, path)
    for dtype in DTYPES.values():
        N = 64
        base = rows_for(N, seed=3).to(dtype)
        R = base.shape[0]
        x = torch.empty(R * N + 1, dtype=dtype)[1:].view(R, N)
        x.copy_(base)
        assert x.data_ptr() % 16 != 0
        t = targets_for(x, seed=3)
        for kind in (0, 1):
            p = check_entmax(ops, x, kind, target=t)
        check_entmax(ops, x, 2, alpha=torch.tensor(ALPHAS[:R]))
        check_topk(ops, x, 5, target=t)
        dp = torch.empty(R * N + 1, dtype=dtype)[1:].view(R, N)
        dp.copy_(torch.randn(R, N, generator=torch.Generator().manual_seed(5)))
        pp = torch.empty(R * N + 1, dtype=dtype)[1:].view(R, N)
        pp.copy_(p)
        check_backward(ops, pp, dp, 1)


# ---- top-k ties: the lowest indices win, the cut found by the tile scan in a later tile ----

@pytest.mark.parametrize("path,N,dtype", [
    ("warp", 300, torch.float32),     # vector tiles of 32 x 4
    ("warp", 301, torch.bfloat16),    # scalar tiles of 32
    ("onchip", 2100, torch.float32),  # vector tiles of 512 x 4
    ("onchip", 1101, torch.float16),  # scalar tiles of 512
    ("stream", 1100, torch.float32),  # vector: one tile of 2048
    ("stream", 1101, torch.bfloat16),  # scalar tiles of 512
])
def test_topk_ties_in_index_order(ops, monkeypatch, path, N, dtype):
    use_path(monkeypatch, path)
    g = torch.Generator().manual_seed(N)
    x = torch.randint(0, 3, (3, N), generator=g).float()  # about N / 3 entries tie at each value
    x[2] = 0.5  # the whole row one value: v = 0.5, need = k of N ties
    x = x.to(dtype)
    for k in (1, N // 3 + N // 5, N - 7, N):
        p = check_topk(ops, x, k)
        # row 2: exactly the first k indices
        assert (p[2, :k] > 0).all() and (p[2, k:] == 0).all()


def test_topk_selects_masked_entries(ops, monkeypatch):
    """k beyond the finite count: -inf entries tie at v = -inf, the lowest indices are selected with p = 0."""
    for path in PATHS:
        use_path(monkeypatch, path)
        x = torch.full((2, 41), NINF)
        x[0, 5] = 1.0
        x[0, 30] = 2.0
        x[1, ::2] = torch.arange(21.0)
        for k in (2, 3, 30, 41):
            check_topk(ops, x, k, target=torch.tensor([4, 1]))


# ---- long rows on chip beyond 48 KB (the opt-in), and the device's opt-in limit forcing the stream path ----

@pytest.mark.parametrize("optin", [None, 48 * 1024])
def test_long_row_optin(ops, monkeypatch, optin):
    use_path(monkeypatch, "warp")  # default thresholds: 13000 fp32 entries (52 KB) go to the block path
    if optin is not None:
        monkeypatch.setenv("KXOPS_EMU_SMEM_OPTIN", str(optin))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 13000, generator=g) * 3
    x[1, 7::5] = NINF
    t = torch.tensor([3, 7])
    check_entmax(ops, x, 1, target=t)
    check_entmax(ops, x, 0)
    check_topk(ops, x, 1000, target=t)


# ---- grid-stride loops: more rows than blocks ----

@pytest.mark.parametrize("path", list(PATHS))
def test_grid_stride(ops, monkeypatch, path):
    use_path(monkeypatch, path)
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "1")
    R = 19 if path == "warp" else 8  # the warp path serves 8 rows a block, the others one
    x = torch.cat([rows_for(40, seed=s) for s in range(3)])[:R].to(torch.bfloat16)
    t = targets_for(x)
    dp = torch.randn(R, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    p = check_entmax(ops, x, 1, target=t)
    check_backward(ops, p, dp, 1)
    alpha = torch.full((R,), 1.5)
    p = check_entmax(ops, x, 2, alpha=alpha)
    check_backward(ops, p, dp, 2, alpha)
    p = check_topk(ops, x, 6, target=t)
    check_backward(ops, p, dp, 3)


# ---- bisection edge: n_iter = 0 (lo never moves: p = relu(z + 1)^e / its sum, the contract's formula) ----

@pytest.mark.parametrize("path", list(PATHS))
def test_bisect_no_iterations(ops, monkeypatch, path):
    use_path(monkeypatch, path)
    x = rows_for(37, seed=9)
    alpha = torch.tensor(ALPHAS[:x.shape[0]])
    p, _ = ops.entmax(x, alpha, 2, 0, None, IGNORE)
    x64, c = x.double(), alpha.double().unsqueeze(-1) - 1
    m = x64.amax(-1, keepdim=True)
    dead = m == NINF
    u = ((x64 - torch.where(dead, 0.0, m)) * c + 1).clamp_min(0)
    e = u ** (1 / c)
    want = torch.where(dead, 0.0, e / torch.where(dead, 1.0, e.sum(-1, keepdim=True)))
    assert (p.double() - want).abs().max() <= 2e-6


def test_empty_rows(ops):
    x = torch.empty(0, 5)
    p, loss = ops.entmax(x, None, 0, 50, torch.empty(0, dtype=torch.long), IGNORE)
    assert p.shape == (0, 5) and loss.shape == (0,)
    dx, da = ops.entmax_backward(x, x, torch.empty(0), 2, True)
    assert dx.shape == (0, 5) and da.shape == (0,)
    p, loss = ops.topk_softmax(x, 1, None, IGNORE)
    assert p.shape == (0, 5) and loss.shape == (0,)
