"""The Triton sparse softmax kernels (triton_kernels/sparse_softmax.py: entmax_forward, entmax_backward,
topk_softmax_forward) on the kernel contract's normalised arguments, against the reference on the same arguments
(pyext/reference/sparse_softmax.py: entmax_ref, topk_softmax_ref, entmax_backward_ref) under the project's
equivalence rule: the float64 reference, and the reference in the test dtype for the bar. Without a GPU they run
in Triton's interpreter (few rows: every program instance costs milliseconds there). Both paths run: on chip (the
row in one block) and chunked (block_cap=32: N = 70 is two full chunks and a partial one, so every pass loops,
carries its partial sums and, for top-k, the running count of the ties at v across chunks).

Rows cover: moderate, wide (sparse support) and narrow (dense support) values, -inf entries (some, all but one,
all: p = 0, loss +inf, dx = 0, dalpha = 0), ties at the threshold (exactly representable cases where entries
sit on tau), a constant row, ties at the k-th value (lowest indices win, -0.0 == +0.0), ignored and -inf
targets."""
import pytest
import torch

from kxops.triton_kernels import sparse_softmax as tss
from testing import DTYPE_IDS, DTYPES, HAS_CUDA, assert_close_to_ref, reference_module

ref = reference_module("sparse_softmax")

DEVICE = "cuda" if HAS_CUDA else "cpu"
IGNORE = -100
NINF = float("-inf")
# path -> (N, block_cap): the row in one on-chip block, or chunks of 32 (two full, one partial)
PATHS = {"onchip": (100, None), "chunked": (70, 32)}
ALPHAS = (1.5, 1.25, 2.0, 3.0, 1.75, 1.125, 1.5, 2.5)  # exact in fp16 / bf16 (the reference casts alpha to x's dtype)


def _rows(N, kind, gen):
    """(x float32 (R, N), target int64 (R,)): the scenario rows of a forward test."""
    r = lambda s: torch.randn(N, generator=gen) * s  # noqa: E731
    rows = [r(1.0), r(4.0), r(0.05)]
    some = r(2.0)
    some[torch.randperm(N, generator=gen)[: N // 3]] = NINF
    rows.append(some)
    one = torch.full((N,), NINF)
    one[N // 2] = 0.7
    rows.append(one)  # all but one masked
    rows.append(torch.full((N,), NINF))  # all -inf
    tie = torch.full((N,), -6.0)
    if kind == 0:
        # z = [0, -0.5, -0.75, -0.75, ...]: tau = -0.75 (support {0, -0.5}), two entries sit on tau
        tie[[3, 9, 17, 40]] = torch.tensor([3.0, 2.5, 2.25, 2.25])
        tie[:3] = -4.0
    elif kind == 1:
        # z = (x - m) / 2 = [0, -1, -1, ...]: tau = -1, the entries at -1 sit on tau
        tie[[5, 11, 12]] = torch.tensor([1.0, -1.0, -1.0])
    else:
        tie = torch.randint(0, 4, (N,), generator=gen).float() * 0.5  # many ties (top-k: at the k-th value)
        tie[[1, 2]] = torch.tensor([-0.0, 0.0])
    rows.append(tie)
    x = torch.stack(rows)
    R = x.shape[0]
    target = torch.randint(0, N, (R,), generator=gen)
    target[0] = IGNORE
    target[3] = (x[3] == NINF).nonzero()[0, 0]  # a -inf target: loss +inf
    target[4] = N // 2  # the one live entry
    target[5] = 1  # the all -inf row, not ignored: +inf
    return x, target


def _check_loss(out, r64, rlp):
    """+inf exactly where the float64 reference has it, the rule on the other rows."""
    inf = torch.isinf(r64)
    assert torch.equal(torch.isposinf(out.cpu()), inf), (out, r64)
    assert_close_to_ref(out.cpu()[~inf], r64[~inf], rlp[~inf], "loss")


def _check_dead(p, x):
    """All -inf rows: p exactly 0."""
    dead = (x == NINF).all(-1)
    assert (p.cpu()[dead] == 0).all()


def _entmax(x, alpha, kind, target, n_iter=50, **kw):
    return tss.entmax_forward(x.to(DEVICE), None if alpha is None else alpha.to(DEVICE), kind, n_iter,
                              None if target is None else target.to(DEVICE), IGNORE, traceable=False, **kw)


def _topk(x, k, target, **kw):
    return tss.topk_softmax_forward(x.to(DEVICE), k, None if target is None else target.to(DEVICE), IGNORE,
                                    traceable=False, **kw)


# ---------------------------------------------------------------------------------------------
# Op 1: entmax

@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", [0, 1, 2])
def test_entmax_forward(kind, dtype, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(10 * kind + N)
    x32, target = _rows(N, kind, gen)
    x = x32.to(dtype)
    alpha = torch.tensor(ALPHAS[: x.shape[0]]) if kind == 2 else None
    if kind == 2:
        target = None  # no loss for the bisection
        if path == "chunked":  # ~25 halvings over 3 chunks per row: the slowest case in the interpreter
            x, alpha = x[[1, 3, 4, 5]], alpha[[1, 3, 4, 5]]
    p, loss = _entmax(x, alpha, kind, target, block_cap=cap)
    a64 = None if alpha is None else alpha.double()
    p64, l64 = ref.entmax_ref(x.double(), a64, kind, 50, target, IGNORE)
    plp, llp = ref.entmax_ref(x, alpha, kind, 50, target, IGNORE)
    assert p.dtype == dtype and loss.dtype == torch.float32
    assert_close_to_ref(p.cpu(), p64, plp, "p")
    _check_dead(p, x)
    if target is None:
        assert loss.shape == (0,)
    else:
        assert loss.shape == (x.shape[0],)
        assert loss[0].item() == 0.0  # ignored
        _check_loss(loss, l64, llp)
    if kind < 2:  # the ties at the threshold get p = 0, the support is the reference's
        assert torch.equal(p.cpu()[6] > 0, p64[6] > 0)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", [0, 1])
def test_entmax_forward_without_target(kind, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(7 + kind)
    x, _ = _rows(N, kind, gen)
    x = x[[0, 1, 2, 5]].to(torch.bfloat16)
    p, loss = _entmax(x, None, kind, None, block_cap=cap)
    assert loss.shape == (0,) and loss.dtype == torch.float32
    assert_close_to_ref(p.cpu(), ref.entmax_ref(x.double(), None, kind, 50, None, IGNORE)[0],
                        ref.entmax_ref(x, None, kind, 50, None, IGNORE)[0], "p")
    _check_dead(p, x)


def _bisect_contract(x, alpha, n_iter):
    """The contract's kind-2 algorithm itself (float64): n_iter halvings at most, p normalised at lo."""
    out = torch.zeros_like(x)
    for r in range(x.shape[0]):
        m = x[r].max()
        if m == NINF:
            continue
        c = alpha[r] - 1
        z = c * (x[r] - m)
        lo, hi = torch.tensor(-1.0, dtype=x.dtype), -(1.0 / x.shape[1]) ** c
        for _ in range(n_iter):
            mid = (lo + hi) / 2
            if mid <= lo or mid >= hi:
                break
            if ((z - mid).clamp_min(0) ** (1 / c)).sum() >= 1:
                lo = mid
            else:
                hi = mid
        u = (z - lo).clamp_min(0) ** (1 / c)
        out[r] = u / u.sum()
    return out


@pytest.mark.parametrize("path", list(PATHS))
def test_bisect_stops_after_n_iter(path):
    """n_iter bounds the halvings (before the interval collapses): p is normalised at that lo. The reference
    adds a Newton step there (it is only the same result once the bisection has converged), so the contract's
    algorithm in float64 is the bar here."""
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, N, generator=gen) * 2
    x[2] = NINF
    alpha = torch.tensor([1.5, 2.5, 1.5])
    for n_iter in (1, 4):
        p, _ = _entmax(x, alpha, 2, None, n_iter=n_iter, block_cap=cap)
        want64 = _bisect_contract(x.double(), alpha.double(), n_iter)
        assert_close_to_ref(p.cpu(), want64, _bisect_contract(x, alpha, n_iter), f"p (n_iter {n_iter})")
        # far from the converged result: the bound was applied
        assert (p.cpu() - ref.entmax_ref(x.double(), alpha.double(), 2, 50, None, IGNORE)[0]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Op 3: top-k softmax

# k = 1, k = N, ties at the k-th value on chip in every dtype; the chunked path (32 select passes over every
# chunk: slow in the interpreter) once per dtype, k = 1 and k = N included
TOPK_CASES = [(d, "onchip", k) for d in DTYPES for k in (1, 7, "N")] + \
             [(torch.float32, "chunked", 40), (torch.bfloat16, "chunked", 1), (torch.float16, "chunked", "N")]


@pytest.mark.parametrize("dtype,path,k", TOPK_CASES,
                         ids=[f"{DTYPE_IDS[d]}-{p}-k{k}" for d, p, k in TOPK_CASES])
def test_topk_softmax_forward(dtype, path, k):
    N, cap = PATHS[path]
    k = N if k == "N" else k
    gen = torch.Generator().manual_seed(N + (k if isinstance(k, int) else 0))
    x32, target = _rows(N, 2, gen)  # row 6: values in {0, .5, 1, 1.5}: ties at the k-th value, -0.0 / +0.0
    if path == "chunked":
        keep = [1, 3, 4, 5, 6]  # few rows: 32 select passes over 3 chunks each
        x32, target = x32[keep], target[keep]
        target[0] = IGNORE
    x = x32.to(dtype)
    p, loss = _topk(x, k, target, block_cap=cap)
    p64, l64 = ref.topk_softmax_ref(x.double(), k, target, IGNORE)
    plp, llp = ref.topk_softmax_ref(x, k, target, IGNORE)
    assert p.dtype == dtype and loss.dtype == torch.float32
    assert_close_to_ref(p.cpu(), p64, plp, "p")
    _check_dead(p, x)
    # the selected set is the reference's (ties by index): 0 off it, > 0 on it (where p64 cannot underflow)
    sel = ref.topk_mask(x.double(), k)
    assert (p.cpu()[~sel] == 0).all()
    assert (p.cpu()[sel & (p64 > 1e-3)] > 0).all()
    assert loss[0].item() == 0.0
    _check_loss(loss, l64, llp)


def test_topk_ties_across_chunks():
    """Every entry ties at v = 1 except three larger ones: the first k - 3 ones by index, across chunks."""
    x = torch.ones(2, 70)
    x[:, [5, 40, 66]] = 2.0
    x[1, :20] = -0.0  # -0.0 ties +0.0 (both keys are +0.0's)
    x[1, 30:50] = 0.0
    for k, cap in ((45, 32), (45, None), (20, 32)):
        p, loss = _topk(x, k, None, block_cap=cap)
        assert loss.shape == (0,)
        assert torch.equal(p.cpu() > 0, ref.topk_mask(x, k)), (k, cap)
        assert_close_to_ref(p.cpu(), ref.topk_softmax_ref(x.double(), k, None, IGNORE)[0],
                            ref.topk_softmax_ref(x, k, None, IGNORE)[0], "p")


# ---------------------------------------------------------------------------------------------
# Op 2: the backward

def _bwd_inputs(N, kind, dtype, gen):
    x32, _ = _rows(N, kind if kind < 3 else 2, gen)
    x = x32.to(dtype)
    R = x.shape[0]
    alpha = torch.tensor(ALPHAS[:R])
    if kind == 3:
        p = ref.topk_softmax_ref(x, 9, None, IGNORE)[0]
    else:
        p = ref.entmax_ref(x, alpha, kind, 50, None, IGNORE)[0]
    dp = torch.randn(R, N, generator=gen).to(dtype)
    return p, dp, alpha


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_entmax_backward(kind, dtype, path):
    N, cap = PATHS[path]
    gen = torch.Generator().manual_seed(100 + kind)
    p, dp, alpha = _bwd_inputs(N, kind, dtype, gen)
    alpha_grad = kind == 2
    dx, dalpha = tss.entmax_backward(dp.to(DEVICE), p.to(DEVICE), alpha.to(DEVICE), kind, alpha_grad,
                                     traceable=False, block_cap=cap)
    dx64, da64 = ref.entmax_backward_ref(dp.double(), p.double(), alpha.double(), kind, alpha_grad)
    dxlp, dalp = ref.entmax_backward_ref(dp, p, alpha, kind, alpha_grad)
    assert dx.dtype == dtype and dalpha.dtype == torch.float32
    assert_close_to_ref(dx.cpu(), dx64, dxlp, "dx")
    dead = (p == 0).all(-1)
    assert dead.any() and (dx.cpu()[dead] == 0).all()
    assert (dx.cpu()[p == 0] == 0).all()  # 0 off the support
    if alpha_grad:
        assert_close_to_ref(dalpha.cpu(), da64, dalp, "dalpha")
        assert (dalpha.cpu()[dead] == 0).all()
    else:
        assert dalpha.shape == (0,)


def test_entmax_backward_bisect_without_alpha_grad():
    gen = torch.Generator().manual_seed(5)
    p, dp, alpha = _bwd_inputs(37, 2, torch.float32, gen)
    dx, dalpha = tss.entmax_backward(dp.to(DEVICE), p.to(DEVICE), alpha.to(DEVICE), 2, False, traceable=False)
    assert dalpha.shape == (0,)
    assert_close_to_ref(dx.cpu(), ref.entmax_backward_ref(dp.double(), p.double(), alpha.double(), 2, False)[0],
                        ref.entmax_backward_ref(dp, p, alpha, 2, False)[0], "dx")


# ---------------------------------------------------------------------------------------------
# Short rows: N = 1, 2, 3, 37, every op

@pytest.mark.parametrize("N", [1, 2, 3, 37])
def test_short_rows(N):
    gen = torch.Generator().manual_seed(N)
    x = torch.randn(4, N, generator=gen) * 2
    x[1, 0] = NINF  # N = 1: an all -inf row, ignored (loss 0)
    x[2] = NINF  # all -inf, not ignored
    if N > 2:
        x[3, : N - 1] = torch.tensor([0.5]).expand(N - 1)  # ties
    x = x.to(torch.bfloat16 if N == 3 else torch.float32)
    target = torch.tensor([0, IGNORE, N - 1, N // 2])
    alpha = torch.tensor([1.5, 2.0, 1.25, 3.0])
    for kind in (0, 1, 2):
        t = target if kind < 2 else None
        p, loss = _entmax(x, alpha, kind, t)
        p64, l64 = ref.entmax_ref(x.double(), alpha.double(), kind, 50, t, IGNORE)
        plp, llp = ref.entmax_ref(x, alpha, kind, 50, t, IGNORE)
        assert_close_to_ref(p.cpu(), p64, plp, f"p (kind {kind})")
        _check_dead(p, x)
        if t is not None:
            assert loss[1].item() == 0.0
            _check_loss(loss, l64, llp)
        for bkind in ((kind, 3) if kind == 2 else (kind,)):
            pb = p.cpu() if bkind < 3 else ref.topk_softmax_ref(x, 1, None, IGNORE)[0]
            dp = torch.randn(4, N, generator=gen).to(x.dtype)
            dx, da = tss.entmax_backward(dp.to(DEVICE), pb.to(DEVICE), alpha.to(DEVICE), bkind, bkind == 2,
                                         traceable=False)
            r64 = ref.entmax_backward_ref(dp.double(), pb.double(), alpha.double(), bkind, bkind == 2)
            rlp = ref.entmax_backward_ref(dp, pb, alpha, bkind, bkind == 2)
            assert_close_to_ref(dx.cpu(), r64[0], rlp[0], f"dx (kind {bkind})")
            if bkind == 2:
                assert_close_to_ref(da.cpu(), r64[1], rlp[1], "dalpha")
    for k in sorted({1, N}):
        p, loss = _topk(x, k, target)
        p64, l64 = ref.topk_softmax_ref(x.double(), k, target, IGNORE)
        assert_close_to_ref(p.cpu(), p64, ref.topk_softmax_ref(x, k, target, IGNORE)[0], f"p (top-{k})")
        _check_loss(loss, l64, ref.topk_softmax_ref(x, k, target, IGNORE)[1])


# ---------------------------------------------------------------------------------------------
# Launch through torch.library.wrap_triton, empty inputs, argument checks

def test_traceable_launch():
    gen = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 37, generator=gen) * 2).to(DEVICE)
    target = torch.tensor([3, IGNORE], device=DEVICE)
    for kind in (0, 1):
        a = tss.entmax_forward(x, None, kind, 50, target, IGNORE, traceable=True)
        b = tss.entmax_forward(x, None, kind, 50, target, IGNORE, traceable=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    a = tss.topk_softmax_forward(x, 5, target, IGNORE, traceable=True)
    assert torch.equal(a[0], tss.topk_softmax_forward(x, 5, target, IGNORE, traceable=False)[0])
    dp = torch.randn(2, 37, generator=gen).to(DEVICE)
    alpha = torch.tensor([1.5, 2.0], device=DEVICE)
    a = tss.entmax_backward(dp, x.softmax(-1), alpha, 2, True, traceable=True)
    b = tss.entmax_backward(dp, x.softmax(-1), alpha, 2, True, traceable=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_empty_rows():
    x = torch.zeros(0, 5, device=DEVICE)
    p, loss = tss.entmax_forward(x, None, 0, 50, torch.zeros(0, dtype=torch.int64, device=DEVICE), IGNORE)
    assert p.shape == (0, 5) and loss.shape == (0,) and loss.dtype == torch.float32
    p, loss = tss.topk_softmax_forward(x, 2, None, IGNORE)
    assert p.shape == (0, 5) and loss.shape == (0,)
    dx, da = tss.entmax_backward(x, x, torch.zeros(0, device=DEVICE), 2, True)
    assert dx.shape == (0, 5) and da.shape == (0,)


@pytest.mark.parametrize("call,message", [
    (lambda x: tss.entmax_forward(x.double(), None, 0, 50, None, IGNORE), "unsupported dtype"),
    (lambda x: tss.entmax_forward(x, None, 3, 50, None, IGNORE), "kind"),
    (lambda x: tss.entmax_forward(x, None, 2, 50, None, IGNORE), "alpha"),
    (lambda x: tss.entmax_forward(x, torch.full((2,), 1.5), 2, 50, torch.zeros(2, dtype=torch.int64), IGNORE),
     "kinds 0 and 1"),
    (lambda x: tss.topk_softmax_forward(x, 6, None, IGNORE), "k must be"),
    (lambda x: tss.entmax_backward(x, x, None, 0, True), "alpha_grad"),
    (lambda x: tss.entmax_forward(x, None, 0, 50, None, IGNORE, block_cap=48), "block_cap"),
], ids=["dtype", "kind", "alpha", "loss-kind", "k", "alpha-grad", "cap"])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(2, 5))
