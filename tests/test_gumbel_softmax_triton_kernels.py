"""The Triton Gumbel-softmax / Gumbel-max / perturb-max kernels (triton_kernels/gumbel_softmax.py) on the kernel
contract's normalised arguments (docs/gumbel_softmax_kernel_contract.md), against the reference on the same
arguments (pyext/reference/gumbel_softmax.py) under the project's equivalence rule: the float64 reference (same
seed: the same random words, float64 noise) and the reference in the test dtype for the bar; the sample index
bitwise equal to the reference's. Without a GPU they run in Triton's interpreter (few rows, short rows). Both
paths run: on chip (the row in one block) and chunked (block_cap=32: N = 70 is two full chunks and a partial one,
so the online max / first-argmax / rescaled sum carry across chunks and the second pass regenerates the noise).

Rows cover: moderate and wide values, -inf entries (some, all but one, all: y = soft = 0, index = -1), a constant
row (without noise: ties, the lowest index wins), tau 1e-3 / 1 / 1e3, odd N (1, 3, 5), seeds with both 32-bit
halves set and negative seeds; Philox counters with a non-zero high word (a direct noise kernel)."""
import math

import pytest
import torch
import triton
import triton.language as tl

from kxops.triton_kernels import gumbel_softmax as tgs
from testing import DTYPE_IDS, DTYPES, HAS_CUDA, assert_close_to_ref, reference_module

ref = reference_module("gumbel_softmax")

DEVICE = "cuda" if HAS_CUDA else "cpu"
NINF = float("-inf")
# path -> (N, block_cap): the row in one on-chip block, or chunks of 32 (two full, one partial)
PATHS = {"onchip": (70, None), "chunked": (70, 32)}
SEEDS = (0x1234_5678_9ABC_DEF0, -7, 2**63 - 1, -2**63, 0, 3)


def _seed(i):
    return torch.tensor([SEEDS[i % len(SEEDS)]], dtype=torch.int64, device=DEVICE)


def _rows(N, gen):
    """x float32 (R, N): the scenario rows."""
    r = lambda s: torch.randn(N, generator=gen) * s  # noqa: E731
    rows = [r(1.0), r(4.0)]
    some = r(2.0)
    some[torch.randperm(N, generator=gen)[: max(1, N // 3)]] = NINF
    rows.append(some)
    one = torch.full((N,), NINF)
    one[N // 2] = 0.7
    rows.append(one)  # all but one masked
    rows.append(torch.full((N,), NINF))  # all -inf
    rows.append(torch.full((N,), 0.25))  # constant: without noise every entry ties
    return torch.stack(rows)


def _fwd(x, seed, tau, hard, cap):
    return tgs.gumbel_softmax_forward(x.to(DEVICE), seed, tau, hard, traceable=False, block_cap=cap)


def _seed_ref(seed):
    return None if seed is None else seed.cpu()


def _check_forward(x, seed, tau, hard, cap):
    y, soft, index = _fwd(x, seed, tau, hard, cap)
    s = _seed_ref(seed)
    y64, soft64, i64 = ref.gumbel_softmax_ref(x.double(), s, tau, hard)
    ylp, softlp, ilp = ref.gumbel_softmax_ref(x, s, tau, hard)
    y, soft, index = y.cpu(), soft.cpu(), index.cpu()
    assert y.dtype == x.dtype and index.dtype == torch.int64 and index.shape == (x.shape[0],)
    assert torch.equal(index, ilp), (index, ilp)  # the sample: bitwise (the same float32 v)
    dead = (x == NINF).all(-1)
    assert (index[dead] == -1).all()
    if hard:
        assert soft.shape == x.shape and soft.dtype == x.dtype
        assert torch.equal(y, ylp.detach()), "the exact one-hot"
        assert_close_to_ref(soft, soft64, softlp, "soft")
        assert (soft[dead] == 0).all()
    else:
        assert soft.shape == (0,) and soft.dtype == x.dtype
        assert_close_to_ref(y, y64, ylp, "y")
    assert (y[dead] == 0).all()
    return y, soft, index


# ---------------------------------------------------------------------------------------------
# the noise itself

@triton.jit
def _noise_kernel(OUT, SEED, crow, n, BLOCK: tl.constexpr):
    """The module's noise helper on counters crow, crow + 1, ...: entries 0 .. n - 1."""
    g = tgs._gumbel(tl.load(SEED), crow, 0, BLOCK)
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, g, mask=offs < n)


@pytest.mark.parametrize("crow", [0, 5, 2**32 - 2, 3 * 2**32 + 17])
def test_noise_words(crow):
    """g of consecutive entries: words 0..3 of Philox blocks crow, crow + 1, ... (key = the seed's 64 bits), against
    the reference's Philox, uniform map and float32 -log(-log u); counters across the 2^32 boundary use c_hi."""
    n = 62
    for i in range(3):
        seed = _seed(i)
        out = torch.empty(n, dtype=torch.float32, device=DEVICE)
        _noise_kernel[(1,)](out, seed, crow, n, BLOCK=64)
        c = crow + torch.arange(16, dtype=torch.int64)
        key = int(seed.item()) & (2**64 - 1)
        zero = torch.zeros_like(c)
        w = torch.stack(ref.philox4x32_10(key, c & 0xFFFFFFFF, c >> 32, zero, zero), -1).reshape(-1)[:n]
        u = ((w >> 9) * 2 + 1).to(torch.float64) * 2.0**-24
        want = -torch.log(-torch.log(u.float()))
        # float32 logs (interpreter: numpy's, GPU: the device's): within two units in the last place
        assert (out.cpu() - want).abs().max().item() <= 4 * 2.0**-24 * want.abs().max().item()
        assert torch.equal(out.cpu().argmax(), want.argmax())
    # and the reference's own row counters (r * G + i // 4) through the forward: y = softmax(g) for x = 0
    seed = _seed(0)
    x = torch.zeros(3, 9, device=DEVICE)
    y, _, idx = tgs.gumbel_softmax_forward(x, seed, 1.0, False, traceable=False)
    g = ref.gumbel_noise(seed.cpu(), 3, 9, torch.float32)
    assert torch.equal(idx.cpu(), g.argmax(1))
    assert (y.cpu() - torch.softmax(g, 1)).abs().max() < 1e-6


# ---------------------------------------------------------------------------------------------
# Op 1: Gumbel-softmax

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["soft", "hard", "nonoise", "nonoise-hard"])
def test_gumbel_softmax_forward(mode, dtype, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(N + len(mode))
    x = _rows(N, gen).to(dtype)
    seed = None if mode.startswith("nonoise") else _seed(len(mode))
    y, _, index = _check_forward(x, seed, 0.8, mode.endswith("hard"), cap)
    if seed is None:
        assert index[5].item() == 0  # the constant row: the lowest of the tied indices
        assert index[3].item() == N // 2


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("tau", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_gumbel_softmax_tau(dtype, tau, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(11)
    x = _rows(N, gen)[[0, 1, 2, 4]].to(dtype)
    _check_forward(x, _seed(1), tau, False, cap)
    _check_forward(x, _seed(2), tau, True, cap)


@pytest.mark.parametrize("N", [1, 3, 5, 17])
def test_gumbel_softmax_short_rows(N):
    gen = torch.Generator().manual_seed(N)
    x = _rows(N, gen)
    for dtype, hard, s in [(torch.float32, False, 0), (torch.float16, True, 1), (torch.bfloat16, False, None)]:
        seed = None if s is None else _seed(s)
        _check_forward(x.to(dtype), seed, 0.5, hard, None)
    if N >= 16:
        _check_forward(x, _seed(3), 0.5, True, 16)  # chunked, one partial chunk


def test_gumbel_softmax_seeds_differ():
    """Different seeds give different samples; the same seed the same (the kernel reads the seed tensor)."""
    x = torch.zeros(4, 64, device=DEVICE)
    a = _fwd(x, _seed(0), 1.0, False, None)[2]
    b = _fwd(x, _seed(1), 1.0, False, None)[2]
    c = _fwd(x, _seed(0), 1.0, False, 32)[2]
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Op 2: backward

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gumbel_softmax_backward(dtype, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(5)
    x = _rows(N, gen)
    y = ref.gumbel_softmax_ref(x, _seed(0).cpu(), 0.7, False)[0].to(dtype)  # includes an all-zero row
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    for tau in (0.7, 1e-2):
        dx = tgs.gumbel_softmax_backward(dy.to(DEVICE), y.to(DEVICE), tau, traceable=False, block_cap=cap).cpu()
        assert dx.dtype == dtype and dx.shape == y.shape
        assert_close_to_ref(dx, ref.gumbel_softmax_backward_ref(dy.double(), y.double(), tau),
                            ref.gumbel_softmax_backward_ref(dy, y, tau), "dx")
        assert (dx[4] == 0).all()  # y = 0 row


# ---------------------------------------------------------------------------------------------
# Op 3: Gumbel-max

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gumbel_max(dtype, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(9)
    x = _rows(N, gen).to(dtype)
    for i in range(2):
        seed = _seed(i)
        idx = tgs.gumbel_max_forward(x.to(DEVICE), seed, traceable=False, block_cap=cap).cpu()
        assert idx.dtype == torch.int64 and idx.shape == (x.shape[0],)
        assert torch.equal(idx, ref.gumbel_max_ref(x, seed.cpu()))
        assert idx[4].item() == -1 and idx[3].item() == N // 2
        assert torch.equal(idx, _fwd(x, seed, 0.3, False, cap)[2].cpu())


def test_bad_input():
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="seed is required"):
        tgs.gumbel_max_forward(x, None, traceable=False)
    with pytest.raises(ValueError, match="one element"):
        tgs.gumbel_softmax_forward(x, torch.zeros(2, dtype=torch.int64, device=DEVICE), 1.0, False, traceable=False)
    with pytest.raises(ValueError, match="tau must be > 0"):
        tgs.gumbel_softmax_forward(x, None, 0.0, False, traceable=False)
    with pytest.raises(ValueError, match="unsupported dtype"):
        tgs.gumbel_softmax_forward(x.double(), None, 1.0, False, traceable=False)
    with pytest.raises(ValueError, match="block_cap"):
        tgs.gumbel_softmax_forward(x, None, 1.0, False, traceable=False, block_cap=24)
    y, soft, idx = tgs.gumbel_softmax_forward(x[:0], _seed(0), 1.0, True, traceable=False)
    assert y.shape == (0, 8) and soft.shape == (0, 8) and idx.shape == (0,)


# ---------------------------------------------------------------------------------------------
# log Phi and its derivative (float64)

@triton.jit
def _log_phi_kernel(L, Rr, D, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(D + o, mask=o < n, other=0.0)
    lv, rv = tgs._log_phi(d, True)
    tl.store(L + o, lv, mask=o < n)
    tl.store(Rr + o, rv, mask=o < n)


def test_log_phi():
    """L against torch.special.log_ndtr (absolute: L enters only through exp(sum L)), r = phi / Phi relative,
    on a grid over every region of the contract's table and its boundaries (d <= -37.5: the contract's
    asymptotic formula; d > 38: 0)."""
    edges = [-37.5, -37.5 + 1e-9, -8 * math.sqrt(2), -8 * math.sqrt(2) + 1e-9, -math.sqrt(2), -math.sqrt(2) + 1e-12,
             -1.0, 0.0, 38.0, 38.0 + 1e-9]
    d = torch.cat([torch.linspace(-60.0, 45.0, 8193, dtype=torch.float64), torch.tensor(edges, dtype=torch.float64)])
    L, R = torch.empty_like(d, device=DEVICE), torch.empty_like(d, device=DEVICE)
    _log_phi_kernel[(triton.cdiv(d.numel(), 2048),)](L, R, d.to(DEVICE), d.numel(), BLOCK=2048)
    L, R = L.cpu(), R.cpu()
    c = 0.5 * math.log(2 * math.pi)
    far, top = d <= -37.5, d > 38
    Lw = torch.where(far, -d * d / 2 - torch.log(-d) - c, torch.special.log_ndtr(d))
    Lw = torch.where(top, 0.0, Lw)
    Rw = torch.where(far, -d, torch.exp(-d * d / 2 - c - torch.special.log_ndtr(d)))
    Rw = torch.where(top, 0.0, Rw)
    scale = Lw.abs().clamp_min(1.0)
    assert ((L - Lw).abs() / scale).max().item() < 1e-14
    big = Rw > 1e-300
    assert ((R - Rw).abs()[big] / Rw[big]).max().item() < 1e-12
    assert (R[~big] == Rw[~big]).all() or (R[~big].abs() < 1e-290).all()


# ---------------------------------------------------------------------------------------------
# Ops 4, 5: perturb-max

def _pm_rows(N, gen):
    r = lambda s: torch.randn(N, generator=gen) * s  # noqa: E731
    rows = [r(1.0), r(20.0)]  # wide: pairs deep in the tail (and beyond -37.5)
    some = r(2.0)
    some[torch.randperm(N, generator=gen)[: max(1, N // 3)]] = NINF
    rows.append(some)
    one = torch.full((N,), NINF)
    one[N // 2] = 0.3
    rows.append(one)
    rows.append(torch.full((N,), NINF))
    rows.append(torch.full((N,), -1.5))  # equal entries: p uniform
    return torch.stack(rows)


# (K, N, dtype, rows): N = 70 is three i- and j-chunks of the 32 x 32 tiles (every row costs K N^2 in the
# interpreter: few rows)
PM_CASES = [(2, 70, torch.float32, [0, 2]), (5, 37, torch.bfloat16, [1, 2, 4]),
            (16, 9, torch.float16, [0, 1, 3, 5]), (16, 20, torch.float32, [1, 2])]


@pytest.mark.parametrize("K,N,dtype,rows", PM_CASES, ids=[f"K{c[0]}-N{c[1]}-{DTYPE_IDS[c[2]]}" for c in PM_CASES])
def test_perturb_max(K, N, dtype, rows):
    gen = torch.Generator().manual_seed(K * 100 + N)
    x = _pm_rows(N, gen).to(dtype)[rows]
    nodes = ref.perturb_max_nodes(K)
    p = tgs.perturb_max_forward(x.to(DEVICE), nodes.to(DEVICE), traceable=False).cpu()
    assert p.dtype == dtype and p.shape == x.shape
    assert_close_to_ref(p, ref.perturb_max_ref(x.double(), nodes), ref.perturb_max_ref(x, nodes), "p")
    assert (p[x == NINF] == 0).all()  # and all -inf rows: p = 0
    dp = torch.randn(x.shape, generator=gen).to(dtype)
    dx = tgs.perturb_max_backward(dp.to(DEVICE), x.to(DEVICE), nodes.to(DEVICE), traceable=False).cpu()
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close_to_ref(dx, ref.perturb_max_backward_ref(dp.double(), x.double(), nodes),
                        ref.perturb_max_backward_ref(dp, x, nodes), "dx")
    assert (dx[x == NINF] == 0).all()
