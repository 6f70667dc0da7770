"""The Triton GlobalPointer loss kernels (triton_kernels/global_pointer.py: loss_forward / loss_backward) on the
kernel contract's normalised arguments, against the reference on the same arguments (pyext/reference/
global_pointer.py: loss_ref) under the project's equivalence rule: float64 reference, and the reference in
the test dtype for the bar. Without a GPU they run in Triton's interpreter (tiny shapes: every block is 16,
so L = 19, 20 reach two i-blocks and two j-tiles per row, and d = 40 two chunks of 16 pairs); the interpreter
computes the tf32x3 products as the GPU does (tf32 pieces)."""
import pytest
import torch

from kxops.reference.global_pointer import loss_ref
from kxops.triton_kernels import global_pointer as tgp
from testing import DTYPE_IDS, HAS_CUDA, assert_close_to_ref

DEVICE = "cuda" if HAS_CUDA else "cpu"


def _inv_freq(d):
    return (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float().to(DEVICE)


def _sparse_labels(B, H, L, counts, gen):
    """CSR rows of flat spans i*L + j, sorted and unique; counts[r] spans in row r (anywhere: also on
    invalid spans, which must add nothing)."""
    rows = [torch.randperm(L * L, generator=gen)[:c].sort().values for c in counts]
    offsets = torch.tensor([0] + [len(x) for x in rows]).cumsum(0).to(torch.int32)
    index = torch.cat(rows).to(torch.int32) if rows else torch.zeros(0, dtype=torch.int32)
    return offsets.to(DEVICE), index.to(DEVICE)


def _dense_labels(B, H, L, hard, gen):
    u = torch.rand(B, H, L, L, generator=gen)
    if hard:  # bfloat16 targets (any float dtype is accepted): 0 and 1 are exact
        return (u < 0.3).to(torch.bfloat16).to(DEVICE)
    t = torch.rand(B, H, L, L, generator=gen)
    t[u < 0.3] = 0.0  # exact 0 and 1 among the soft values
    t[u > 0.8] = 1.0
    return t.to(DEVICE)


# name -> (B, L, H, Hq, d, rope, mask, biases, tril, labels, layout, scale)
#   mask: None, "pad" (trailing padding in batch 0, interior padding in batch 1), "empty" (batch 1 all padding)
#   biases: "", "start", "end", "both"; labels: "sparse", "sparse-empty", "dense-soft", "dense-hard"
#   layout: "contiguous", "sliced" (q, k = halves of a (B, L, Hq, 2d) tensor), "transposed" ((B, Hq, L, d) storage)
CASES = {
    "gp-sparse-pad": (2, 19, 3, 3, 8, True, "pad", "", True, "sparse", "contiguous", None),
    "gp-dense-soft-empty-row": (2, 7, 2, 2, 10, True, "empty", "", True, "dense-soft", "contiguous", None),
    "egp-sparse-biases": (2, 19, 3, 1, 6, True, "pad", "both", True, "sparse", "contiguous", None),
    "egp-dense-hard-full": (1, 20, 3, 1, 8, True, None, "both", False, "dense-hard", "contiguous", None),
    "norope-d5-start": (2, 7, 2, 2, 5, False, "pad", "start", False, "sparse", "contiguous", None),
    "L1": (2, 1, 2, 2, 4, True, None, "end", True, "sparse", "contiguous", None),
    "sliced-d10": (2, 19, 2, 2, 10, True, "pad", "", True, "dense-soft", "sliced", None),
    "transposed-egp-no-labels": (2, 19, 3, 1, 6, True, None, "end", False, "sparse-empty", "transposed", None),
    "large-scores": (1, 20, 2, 2, 8, True, "pad", "both", True, "sparse", "contiguous", 4.0),
    "norope-d1-dense-soft": (1, 7, 2, 2, 1, False, None, "", False, "dense-soft", "contiguous", None),
    "chunks-d40": (1, 19, 2, 2, 40, True, "pad", "both", True, "sparse", "contiguous", None),  # 2 chunks of 16 pairs
}


def _case(name, dtype, seed=0):
    B, L, H, Hq, d, rope, mask_kind, biases, tril, labels, layout, scale = CASES[name]
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    if layout == "sliced":
        x = r(B, L, Hq, 2 * d).to(dtype).to(DEVICE)
        q, k = x[..., :d], x[..., d:]
    elif layout == "transposed":
        q = r(B, Hq, L, d).to(dtype).to(DEVICE).transpose(1, 2)
        k = r(B, Hq, L, d).to(dtype).to(DEVICE).transpose(1, 2)
    else:
        q, k = r(B, L, Hq, d).to(dtype).to(DEVICE), r(B, L, Hq, d).to(dtype).to(DEVICE)
    mask = None
    if mask_kind is not None:
        mask = torch.ones(B, L, dtype=torch.bool)
        if mask_kind == "pad":
            mask[0, L - min(4, L - 1):] = False
            if B > 1:
                mask[1, 1::3] = False
        else:
            mask[0, L - 2:] = False
            mask[1] = False
        mask = mask.to(DEVICE)
    start = r(B, H, L).to(DEVICE) if biases in ("start", "both") else None
    end = r(B, H, L).to(DEVICE) if biases in ("end", "both") else None
    inv = _inv_freq(d) if rope else None
    pos_offsets = pos_index = targets = None
    if labels.startswith("sparse"):
        if labels == "sparse-empty":
            counts = [0] * (B * H)
        else:
            counts = [(3 * r_ + 1) % 11 for r_ in range(B * H)]
            counts[min(1, B * H - 1)] = 0  # an empty row
            if L > 1:
                counts[0] = L * L // 2  # a dense row
        pos_offsets, pos_index = _sparse_labels(B, H, L, [min(c, L * L) for c in counts], gen)
    else:
        targets = _dense_labels(B, H, L, labels == "dense-hard", gen)
    return (q, k, mask, start, end, inv, H, d ** -0.5 if scale is None else scale, tril, pos_offsets, pos_index,
            targets)


def _f64(args):
    """The arguments with every floating tensor in float64 (q, k, biases, inv_freq, targets)."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


FWD = [(n, torch.float32) for n in CASES] + [(n, torch.bfloat16) for n in
                                             ("gp-sparse-pad", "egp-sparse-biases", "egp-dense-hard-full",
                                              "sliced-d10", "large-scores")] + [("gp-sparse-pad", torch.float16)]


@pytest.mark.parametrize("name,dtype", FWD, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in FWD])
def test_loss_forward(name, dtype):
    args = _case(name, dtype)
    out = tgp.loss_forward(*args, traceable=False)
    ref64 = loss_ref(*_f64(args))
    ref_lp = loss_ref(*args)
    B, H = args[0].shape[0], args[6]
    for what, o, r64, rlp in zip(("loss", "lse_neg", "lse_pos"), out, ref64, ref_lp):
        assert o.shape == (B, H) and o.dtype == torch.float32
        assert_close_to_ref(o, r64, rlp, what)
    if name == "gp-dense-soft-empty-row":  # no valid span: exactly log(1) + log(1)
        assert (out[0][1] == 0).all()


def _ref_grads(args, dloss):
    """Gradients of sum(dloss * loss_ref) in q, k and the biases present (autograd of the reference)."""
    q, k, mask, start, end = args[:5]
    leaves = [x.detach().requires_grad_() for x in (q, k, start, end) if x is not None]
    it = iter(leaves)
    q_, k_ = next(it), next(it)
    s_ = next(it) if start is not None else None
    e_ = next(it) if end is not None else None
    loss = loss_ref(q_, k_, mask, s_, e_, *args[5:])[0]
    gs = list(torch.autograd.grad(loss, leaves, dloss.to(loss.dtype)))
    dq, dk = gs.pop(0), gs.pop(0)
    ds = gs.pop(0) if start is not None else None
    de = gs.pop(0) if end is not None else None
    return dq, dk, ds, de


BWD = [(n, torch.float32) for n in ("gp-sparse-pad", "gp-dense-soft-empty-row", "egp-sparse-biases",
                                    "egp-dense-hard-full", "norope-d5-start", "L1", "sliced-d10",
                                    "transposed-egp-no-labels", "large-scores", "chunks-d40")]
BWD += [("egp-sparse-biases", torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", BWD, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in BWD])
def test_loss_backward(name, dtype):
    args = _case(name, dtype)
    B, H = args[0].shape[0], args[6]
    dloss = torch.randn(B, H, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _, lse_neg, lse_pos = tgp.loss_forward(*args, traceable=False)
    out = tgp.loss_backward(dloss, *args, lse_neg, lse_pos, traceable=False)
    ref64 = _ref_grads(_f64(args), dloss.double())
    ref_lp = _ref_grads(args, dloss)
    q, k = args[:2]
    assert out[0].shape == q.shape and out[0].dtype == q.dtype and out[0].is_contiguous()
    assert out[1].shape == k.shape and out[1].dtype == k.dtype and out[1].is_contiguous()
    for what, o, r64, rlp in zip(("dq", "dk", "dstart_bias", "dend_bias"), out, ref64, ref_lp):
        if r64 is None:  # no bias: an empty float32 tensor
            assert o.shape == (0,) and o.dtype == torch.float32, what
        else:  # dq, dk in q's dtype; the bias gradients (B, H, L) float32
            assert_close_to_ref(o, r64, rlp, what)


def test_non_finite_scores_are_excluded():
    """+inf, -inf and NaN scores (here from the biases) count as invalid spans, as in the reference."""
    args = list(_case("egp-sparse-biases", torch.float32))
    start, end = args[3].clone(), args[4].clone()
    start[0, 0, 2] = float("inf")
    start[1, 2, 5] = float("nan")
    end[0, 1, 7] = float("-inf")
    end[1, 0, 3] = float("inf")
    args[3], args[4] = start, end
    out = tgp.loss_forward(*args, traceable=False)
    for what, o, r64, rlp in zip(("loss", "lse_neg", "lse_pos"), out, loss_ref(*_f64(args)), loss_ref(*args)):
        assert_close_to_ref(o, r64, rlp, what)
    dloss = torch.randn(args[0].shape[0], args[6]).to(DEVICE)
    dq, dk, _, _ = tgp.loss_backward(dloss, *args, out[1], out[2], traceable=False)
    ref64, ref_lp = _ref_grads(_f64(args), dloss.double()), _ref_grads(args, dloss)
    assert_close_to_ref(dq, ref64[0], ref_lp[0], "dq")
    assert_close_to_ref(dk, ref64[1], ref_lp[1], "dk")


def test_backward_is_deterministic():
    """No atomics: two runs give the same bits."""
    args = _case("gp-dense-soft-empty-row", torch.float32)
    dloss = torch.randn(args[0].shape[0], args[6]).to(DEVICE)
    _, lse_neg, lse_pos = tgp.loss_forward(*args, traceable=False)
    a = tgp.loss_backward(dloss, *args, lse_neg, lse_pos, traceable=False)
    b = tgp.loss_backward(dloss, *args, lse_neg, lse_pos, traceable=False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
# The span logits (logits_forward / logits_backward) and decoding (decode), on the loss cases' arguments.

from kxops.reference.global_pointer import logits_ref, mlce_ref  # noqa: E402

# name -> dtypes; with their tril, mask, biases, Hq = 1 and RoPE / no RoPE
LOGITS = [("gp-sparse-pad", torch.float32), ("egp-dense-hard-full", torch.float32),
          ("norope-d5-start", torch.float32), ("L1", torch.float32), ("egp-sparse-biases", torch.bfloat16)]


def _score_args(name, dtype):
    return _case(name, dtype)[:9]


def _assert_logits(out, ref64, ref_lp):
    """-inf exactly on the invalid spans, the valid ones under the rule."""
    assert out.shape == ref64.shape and out.dtype == torch.float32
    invalid = ref64 == float("-inf")
    assert torch.equal(out == float("-inf"), invalid)
    assert_close_to_ref(out[~invalid], ref64[~invalid], ref_lp[~invalid], "logits")


@pytest.mark.parametrize("name,dtype", LOGITS, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in LOGITS])
def test_logits_forward(name, dtype):
    args = _score_args(name, dtype)
    out = tgp.logits_forward(*args, traceable=False)
    _assert_logits(out, logits_ref(*_f64(args)), logits_ref(*args))


def _ref_logit_grads(args, dlogits):
    q, k, mask, start, end = args[:5]
    leaves = [x.detach().requires_grad_() for x in (q, k, start, end) if x is not None]
    it = iter(leaves)
    q_, k_ = next(it), next(it)
    s_ = next(it) if start is not None else None
    e_ = next(it) if end is not None else None
    out = logits_ref(q_, k_, mask, s_, e_, *args[5:])
    gs = list(torch.autograd.grad(out, leaves, dlogits.to(out.dtype)))
    dq, dk = gs.pop(0), gs.pop(0)
    return dq, dk, gs.pop(0) if start is not None else None, gs.pop(0) if end is not None else None


@pytest.mark.parametrize("name,dtype", LOGITS, ids=[f"{n}-{DTYPE_IDS[d]}" for n, d in LOGITS])
def test_logits_backward(name, dtype):
    args = _score_args(name, dtype)
    q, k, H, L = args[0], args[1], args[6], args[0].shape[1]
    dlogits = torch.randn(q.shape[0], H, L, L, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    invalid = logits_ref(*args) == float("-inf")
    dlogits[invalid] = float("nan")  # never read: ds is 0 off the valid spans
    out = tgp.logits_backward(dlogits, *args, traceable=False)
    ref64 = _ref_logit_grads(_f64(args), dlogits.double())
    ref_lp = _ref_logit_grads(args, dlogits)
    assert out[0].shape == q.shape and out[0].dtype == q.dtype and out[0].is_contiguous()
    assert out[1].shape == k.shape and out[1].dtype == k.dtype and out[1].is_contiguous()
    for what, o, r64, rlp in zip(("dq", "dk", "dstart_bias", "dend_bias"), out, ref64, ref_lp):
        if r64 is None:
            assert o.shape == (0,) and o.dtype == torch.float32, what
        else:
            assert_close_to_ref(o, r64, rlp, what)
    assert len({id(o) for o in out}) == 4  # distinct tensors (empties too): outputs never alias


DECODE = [("gp-sparse-pad", torch.float32, 0.5), ("egp-dense-hard-full", torch.float32, 0.1),
          ("norope-d5-start", torch.bfloat16, -0.3), ("gp-sparse-pad", torch.float32, 1e9)]


@pytest.mark.parametrize("name,dtype,threshold", DECODE, ids=[f"{n}-{DTYPE_IDS[d]}-{t:g}" for n, d, t in DECODE])
def test_decode(name, dtype, threshold):
    """Exactly (logits_forward > threshold).nonzero() and those logits, in row-major order."""
    args = _score_args(name, dtype)
    spans, scores = tgp.decode(*args, threshold, traceable=False)
    logits = tgp.logits_forward(*args, traceable=False)
    hit = logits > threshold
    assert spans.dtype == torch.int64 and spans.shape[1] == 4 and scores.dtype == torch.float32
    assert torch.equal(spans, hit.nonzero())
    assert torch.equal(scores, logits[hit])
    if threshold > 1e3:
        assert spans.shape == (0, 4)
    else:
        assert spans.shape[0] > 0
        b, h, i, j = spans.unbind(1)
        ref64, ref_lp = logits_ref(*_f64(args)), logits_ref(*args)
        assert_close_to_ref(scores, ref64[b, h, i, j], ref_lp[b, h, i, j], "scores")


def test_decode_threshold_rounds_like_the_logits():
    """A hit is a float32 logit > float32(threshold): a threshold just below a logit's value in float64 but
    rounding to it in float32 is no hit."""
    args = _score_args("norope-d5-start", torch.float32)
    logits = tgp.logits_forward(*args, traceable=False)
    v = logits[logits > -float("inf")].max().item()
    thr = v - 1e-12  # float32(thr) == v
    spans, scores = tgp.decode(*args, thr, traceable=False)
    assert torch.equal(spans, (logits > torch.tensor(thr, dtype=torch.float32)).nonzero())
    assert spans.shape[0] == 0


# ----------------------------------------------------------------------------------------------
# The row losses on materialised logits (mlce_forward / mlce_backward).

def _mlce_case(kind, dtype):
    """x (R, C) with the special rows: 0 some -inf, 1 no positive, 2 only positives (dense) / a positive at -inf,
    3 a positive at -inf, 4 all -inf, 5 +inf and NaN entries; C = 37 (three blocks of 16 classes), or C = 10
    with P = 12 > C ("pos-all": a row holding every class, duplicates)."""
    gen = torch.Generator().manual_seed(3)
    R, C = 6, (10 if kind == "pos-all" else 37)
    x = torch.randn(R, C, generator=gen) * 3
    x[0, [2, 17 % C, 33 % C]] = float("-inf")
    x[3, 5] = float("-inf")
    x[4] = float("-inf")
    x[5, 1], x[5, 7] = float("inf"), float("nan")
    x = x.to(dtype)
    targets = positives = None
    mask_zero = kind == "pos-mask-zero"
    if kind.startswith("dense"):
        u = torch.rand(R, C, generator=gen)
        if kind == "dense-hard":
            targets = (u < 0.3).float()
        else:
            targets = torch.rand(R, C, generator=gen)
            targets[u < 0.3] = 0.0
            targets[u > 0.8] = 1.0
        targets[1] = 0.0
        targets[2] = 1.0
        targets[3, 5] = 1.0
        targets[5, 1] = targets[5, 7] = 0.5
    else:
        P = 12 if kind == "pos-all" else 6
        positives = torch.randint(0, C, (R, P), generator=gen)
        positives[:, 1] = positives[:, 0]  # duplicates
        positives[1] = 0 if mask_zero else positives[1, 0]  # mask_zero: only padding, no positive
        positives[3, 2] = 5  # a positive at -inf
        positives[5, 3], positives[5, 4] = 1, 7  # at +inf, NaN
        if kind == "pos-all":
            positives[2, :C] = torch.arange(C)
            positives[2, C:] = 3
        if mask_zero:
            positives[0, 4] = 0
    return x.to(DEVICE), None if targets is None else targets.to(DEVICE), \
        None if positives is None else positives.to(DEVICE), mask_zero


MLCE = [("dense-soft", torch.float32), ("dense-hard", torch.float32), ("pos", torch.float32),
        ("pos-mask-zero", torch.float32), ("pos-all", torch.float32), ("dense-soft", torch.bfloat16),
        ("pos-mask-zero", torch.float16), ("pos", torch.bfloat16)]


def _f64_x(args):
    return (args[0].double(), None if args[1] is None else args[1].double(), *args[2:])


@pytest.mark.parametrize("kind,dtype", MLCE, ids=[f"{k}-{DTYPE_IDS[d]}" for k, d in MLCE])
def test_mlce(kind, dtype):
    args = _mlce_case(kind, dtype)
    x = args[0]
    out = tgp.mlce_forward(*args, traceable=False)
    ref64, ref_lp = mlce_ref(*_f64_x(args)), mlce_ref(*args)
    for what, o, r64, rlp in zip(("loss", "lse_neg", "lse_pos"), out, ref64, ref_lp):
        assert o.shape == (x.shape[0],) and o.dtype == torch.float32
        assert_close_to_ref(o, r64, rlp, what)
    assert out[0][4] == 0 and out[1][4] == 0 and out[2][4] == 0  # an all -inf row: log(1) + log(1)

    dloss = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(4)).to(DEVICE)
    dx = tgp.mlce_backward(dloss, *args, out[1], out[2], traceable=False)
    assert dx.shape == x.shape and dx.dtype == x.dtype

    def grad(a, g):
        x_ = a[0].detach().requires_grad_()
        loss = mlce_ref(x_, *a[1:])[0]
        return torch.autograd.grad(loss, x_, g.to(loss.dtype))[0]

    assert_close_to_ref(dx, grad(_f64_x(args), dloss.double()), grad(args, dloss), "dx")
    assert (dx[4] == 0).all()  # an all -inf row: no gradient
    assert dx[0, 2] == 0 and dx[3, 5] == 0 and dx[5, 1] == 0 and dx[5, 7] == 0  # non-finite x
    if args[3]:
        assert (dx[:, 0] == 0).all()  # mask_zero: class 0 is no class


def test_mlce_empty():
    """P = 0 (no positives at all), C = 0 (only the threshold classes: loss 0), R = 0."""
    x = torch.randn(3, 20, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    none = torch.zeros(3, 0, dtype=torch.int64, device=DEVICE)
    out = tgp.mlce_forward(x, None, none, False, traceable=False)
    for what, o, r64, rlp in zip(("loss", "lse_neg", "lse_pos"), out, mlce_ref(x.double(), None, none, False),
                                 mlce_ref(x, None, none, False)):
        assert_close_to_ref(o, r64, rlp, what)
    assert (out[2] == 0).all()
    for o in tgp.mlce_forward(torch.zeros(3, 0, device=DEVICE), None, none, False, traceable=False):
        assert o.shape == (3,) and (o == 0).all()
    for o in tgp.mlce_forward(torch.zeros(0, 4, device=DEVICE), torch.zeros(0, 4, device=DEVICE), None, False,
                              traceable=False):
        assert o.shape == (0,)
