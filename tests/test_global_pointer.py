"""kxops.global_pointer_loss: every backend equals the float64 reference (pyext/reference/global_pointer.py),
forward and backward, over sparse and dense labels, masks, tril, the Efficient form (shared q/k and
biases), odd sizes and strided inputs; sparse and dense labels agree; bad input is a clear error."""
import importlib

import pytest
import torch

import kxops
from kxops.reference import global_pointer as gp
from testing import (BACKENDS, DTYPE_IDS, INTERPRETING, backends_where, called_ops, fake_cuda, stand_in_cuda_kernels, assert_close_to_ref, assert_raises_with, bad_input_params, compiled,
                     opcheck)

GPL = kxops.global_pointer_loss
_GPM = importlib.import_module("kxops.global_pointer")


def _backends(*launchers):
    """pytest parameters over the (backend, device) pairs here whose kernels exist for an op: Triton's
    when the family's Triton module has its launchers."""
    pairs = [(b, d) for b, d in BACKENDS if b != "triton" or _GPM.triton_kernels(*launchers)]
    return dict(argnames="backend,device", argvalues=pairs, ids=[f"{b}-{d}" for b, d in pairs])


LOSS = _backends("loss_forward", "loss_backward")
LOGITS = _backends("logits_forward", "logits_backward")
DECODE = _backends("decode", "logits_forward")
ROWS = _backends("mlce_forward", "mlce_backward")


def _spans(B, H, L, n, gen, tril=True):
    b = torch.randint(0, B, (n,), generator=gen)
    h = torch.randint(0, H, (n,), generator=gen)
    i = torch.randint(0, L, (n,), generator=gen)
    j = torch.randint(0, L, (n,), generator=gen)
    if tril:
        i, j = torch.minimum(i, j), torch.maximum(i, j)
    return torch.stack((b, h, i, j), 1)


# Each case: (q, k, labels, mask, kwargs). Small: the Triton interpreter runs ~1 ms per program.
def _case(name, dtype, dev):
    g = torch.Generator().manual_seed(7)

    def r(*s):
        return torch.randn(*s, generator=g).to(dtype).to(dev)
    if name == "B2-L7-H3-d6-sparse":
        return r(2, 7, 3, 6), r(2, 7, 3, 6), _spans(2, 3, 7, 6, g).to(dev), None, {}
    if name == "L1":
        return r(2, 1, 2, 4), r(2, 1, 2, 4), torch.tensor([[0, 1, 0, 0]], device=dev), None, {}
    if name == "types1-mask-padding-row":
        mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [0] * 9], device=dev)  # an all-padding row
        return r(3, 9, 1, 8), r(3, 9, 1, 8), _spans(3, 1, 9, 5, g).to(dev), mask, {}
    if name == "dense-soft-no-tril":
        t = torch.rand(2, 2, 6, 6, generator=g)
        t[t < 0.5] = 0.0
        t[t > 0.9] = 1.0  # exact 0 and 1 among soft values
        return r(2, 6, 2, 10), r(2, 6, 2, 10), t.to(dev), None, dict(tril=False)
    if name == "efficient-biases":
        mask = torch.ones(2, 11, dtype=torch.bool, device=dev)
        mask[1, 8:] = False
        sb, eb = (torch.randn(2, 3, 11, generator=g).to(dev) for _ in range(2))
        return r(2, 11, 1, 8), r(2, 11, 1, 8), _spans(2, 3, 11, 7, g).to(dev), mask, dict(start_bias=sb, end_bias=eb)
    if name == "no-rope-scale-L19":
        return r(1, 19, 2, 4), r(1, 19, 2, 4), _spans(1, 2, 19, 9, g).to(dev), None, dict(rope=False, scale=0.7)
    if name == "strided-qk-duplicates":  # q, k slices of one (B, L, H, 2d) projection; a span listed twice
        x = r(2, 8, 2, 12)
        sp = _spans(2, 2, 8, 5, g)
        return x[..., :6], x[..., 6:], torch.cat((sp, sp[:2])).to(dev), None, {}
    raise KeyError(name)


CASES = ["B2-L7-H3-d6-sparse", "L1", "types1-mask-padding-row", "dense-soft-no-tril", "efficient-biases",
         "no-rope-scale-L19", "strided-qk-duplicates"]


def _leaves(q, k, kw, dtype=None):
    """Fresh leaves of q, k and the biases (in `dtype` when given), and the options holding the biases'."""
    def leaf(t):
        return (t if dtype is None else t.to(dtype)).detach().requires_grad_()
    leaves, kw = [leaf(q), leaf(k)], dict(kw)
    for b in ("start_bias", "end_bias"):
        if b in kw:
            kw[b] = leaf(kw[b])
            leaves.append(kw[b])
    return leaves, kw


def _loss_and_grads(q, k, labels, mask, kw, backend, gout, dtype=None):
    """Per-row losses (B, H) and the gradients of q, k and the biases for the per-row weights gout."""
    leaves, kw = _leaves(q, k, kw, dtype)
    lab = labels.to(dtype) if dtype is not None and labels.is_floating_point() else labels
    loss = GPL(*leaves[:2], lab, mask, reduction="none", backend=backend, **kw)
    gs = torch.autograd.grad(loss, leaves, gout.to(loss.dtype))
    return (loss, *gs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(**LOSS)
def test_loss_and_gradients_match_reference(backend, device, dtype, case):
    q, k, labels, mask, kw = _case(case, dtype, device)
    B, H = q.shape[0], kw["start_bias"].shape[1] if "start_bias" in kw else q.shape[2]
    gout = torch.randn(B, H, generator=torch.Generator().manual_seed(1)).to(device)
    got = _loss_and_grads(q, k, labels, mask, kw, backend, gout)
    ref64 = _loss_and_grads(q, k, labels, mask, kw, "reference", gout, torch.float64)
    reflp = _loss_and_grads(q, k, labels, mask, kw, "reference", gout)
    names = ["loss", "dq", "dk", "dstart", "dend"]
    for i, (o, r64, rlp) in enumerate(zip(got, ref64, reflp)):
        assert_close_to_ref(o, r64, rlp, names[i])


@pytest.mark.parametrize(**LOSS)
def test_sparse_and_dense_labels_agree(backend, device):
    q, k, spans, mask, kw = _case("efficient-biases", torch.float32, device)
    B, H, L = q.shape[0], kw["start_bias"].shape[1], q.shape[1]
    dense = gp.span_labels_to_dense(spans.cpu(), B, H, L, "cpu").to(device)
    gout = torch.randn(B, H, generator=torch.Generator().manual_seed(2)).to(device)
    a = _loss_and_grads(q, k, spans, mask, kw, backend, gout)
    b = _loss_and_grads(q, k, dense, mask, kw, backend, gout)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(**LOSS)
def test_reductions(backend, device):
    q, k, spans, mask, kw = _case("B2-L7-H3-d6-sparse", torch.float32, device)
    rows = GPL(q, k, spans, mask, reduction="none", backend=backend)
    assert rows.shape == (2, 3) and rows.dtype == torch.float32
    torch.testing.assert_close(GPL(q, k, spans, mask, backend=backend), rows.mean())
    torch.testing.assert_close(GPL(q, k, spans, mask, reduction="sum", backend=backend), rows.sum())


def test_gradcheck_cpu_float64():
    q, k, spans, mask, kw = _case("efficient-biases", torch.float64, "cpu")
    leaves = [t.detach().requires_grad_() for t in (q, k, kw["start_bias"].double(), kw["end_bias"].double())]

    def f(q, k, sb, eb):
        return GPL(q, k, spans, mask, start_bias=sb, end_bias=eb, reduction="none", backend="cpu")
    assert torch.autograd.gradcheck(f, leaves)


def test_opcheck_cpu_kernel():
    q, k, spans, mask, kw = _case("efficient-biases", torch.float32, "cpu")
    from kxops.reference.rope import rope_schedule
    off = torch.tensor([0, 2, 3, 3, 5, 5, 6], dtype=torch.int32)
    idx = torch.tensor([3, 40, 5, 0, 120, 7], dtype=torch.int32)
    args = (q.requires_grad_(), k, mask, kw["start_bias"], kw["end_bias"], rope_schedule(8, dtype=torch.float32)[0],
            3, 8 ** -0.5, True, off, idx, None)
    opcheck(torch.ops.kxops.global_pointer_loss.default, args)


@pytest.mark.parametrize(**backends_where(lambda b, d: not (b == "triton" and (INTERPRETING or not _GPM.triton_kernels(
    "loss_forward", "loss_backward", "logits_forward", "logits_backward")))))
def test_compile_fullgraph(backend, device):
    """The loss and the logits under torch.compile(fullgraph=True), forward and backward (Triton where it is
    compiled, not interpreted: on a GPU)."""
    q, k, spans, mask, kw = _case("efficient-biases", torch.float32, device)
    fn = compiled(f"global_pointer-{backend}", lambda q, k, s, m, sb, eb: (
        GPL(q, k, s, m, start_bias=sb, end_bias=eb, backend=backend),
        kxops.global_pointer(q, k, m, start_bias=sb, end_bias=eb, backend=backend).clamp_min(-1e4).sum()))
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    a, b = fn(qq, kk, spans, mask, kw["start_bias"], kw["end_bias"])
    ga = torch.autograd.grad(a + b, (qq, kk))
    qe, ke = q.clone().requires_grad_(), k.clone().requires_grad_()
    a2 = GPL(qe, ke, spans, mask, backend=backend, **kw)
    b2 = kxops.global_pointer(qe, ke, mask, backend=backend, **kw).clamp_min(-1e4).sum()
    gb = torch.autograd.grad(a2 + b2, (qe, ke))
    torch.testing.assert_close((a, b), (a2, b2))
    torch.testing.assert_close(ga, gb)


_CPP_OPS = ("kxops::global_pointer_loss", "kxops::global_pointer_loss_backward", "kxops::global_pointer",
            "kxops::global_pointer_backward")


class _GP(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend

    def forward(self, q, k, spans, mask):
        return GPL(q, k, spans, mask, backend=self.backend), kxops.global_pointer(q, k, mask, backend=self.backend)


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_export_fullgraph_on_cuda_tensors(backend):
    """Strict export (Dynamo, fullgraph) over fake CUDA tensors: the GPU's backend choice, sparse-label
    normalisation and fake kernels trace without a graph break, here without a GPU."""
    q, k, spans, mask = fake_cuda(((2, 9, 3, 8), torch.bfloat16), ((2, 9, 3, 8), torch.bfloat16),
                                  ((4, 4), torch.int64), ((2, 9), torch.bool))
    with stand_in_cuda_kernels(_CPP_OPS):
        ep = torch.export.export(_GP(backend), (q, k, spans, mask), strict=True)
        assert any("global_pointer_loss_front" in t for t in called_ops(ep.graph))
        ep = ep.run_decompositions()
    targets = called_ops(ep.graph)
    assert "kxops.global_pointer_loss.default" in targets and "kxops.global_pointer.default" in targets, targets


def _bad(name):
    q, k = torch.randn(2, 5, 3, 4), torch.randn(2, 5, 3, 4)
    ok = torch.tensor([[0, 1, 2, 3]])
    calls = {
        "label-batch-out-of-range": (lambda: GPL(q, k, torch.tensor([[2, 0, 0, 1]])), ValueError,
                                     "labels[:, 0] (batch) must be in [0, 2)"),
        "label-type-out-of-range": (lambda: GPL(q, k, torch.tensor([[0, 3, 0, 1]])), ValueError,
                                    "labels[:, 1] (type) must be in [0, 3)"),
        "label-end-out-of-range": (lambda: GPL(q, k, torch.tensor([[0, 0, 0, 5]])), ValueError,
                                   "labels[:, 3] (end) must be in [0, 5)"),
        "start-after-end-with-tril": (lambda: GPL(q, k, torch.tensor([[0, 0, 3, 1]])), ValueError,
                                      "start > end"),
        "labels-wrong-shape": (lambda: GPL(q, k, torch.tensor([[0, 0, 3]])), ValueError, "(N, 4) gold spans"),
        "dense-labels-wrong-shape": (lambda: GPL(q, k, torch.zeros(2, 3, 5, 4)), ValueError, "dense labels must be"),
        "dense-labels-above-1": (lambda: GPL(q, k, torch.full((2, 3, 5, 5), 2.0)), ValueError, "in [0, 1]"),
        "labels-bool": (lambda: GPL(q, k, torch.zeros(2, 3, 5, 5, dtype=torch.bool)), TypeError,
                        "labels must be int64 gold spans"),
        "qk-shape-mismatch": (lambda: GPL(q, k[:, :4], ok), ValueError, "k must have q's shape"),
        "qk-dtype-mismatch": (lambda: GPL(q, k.double(), ok), TypeError, "q and k must have one dtype"),
        "q-not-4d": (lambda: GPL(q[0], k[0], ok), ValueError, "q must be (batch, L, types or 1, head_size)"),
        "mask-wrong-shape": (lambda: GPL(q, k, ok, torch.ones(2, 4)), ValueError, "mask must be (batch=2, L=5)"),
        "bias-wrong-shape": (lambda: GPL(q, k, ok, start_bias=torch.zeros(2, 2, 5)), ValueError,
                             "start_bias must be (batch=2, types=3, L=5)"),
        "odd-head-size-rope": (lambda: GPL(q[..., :3], k[..., :3], ok), ValueError, "even head_size"),
        "integer-q": (lambda: GPL(q.int(), k.int(), ok), TypeError, "q must be a floating-point tensor"),
        "bad-reduction": (lambda: GPL(q, k, ok, reduction="avg"), ValueError, "reduction must be one of"),
        "bad-backend": (lambda: GPL(q, k, ok, backend="gpu"), ValueError, "backend must be one of"),
    }
    return calls[name]


BAD = ["label-batch-out-of-range", "label-type-out-of-range", "label-end-out-of-range", "start-after-end-with-tril",
       "labels-wrong-shape", "dense-labels-wrong-shape", "dense-labels-above-1", "labels-bool", "qk-shape-mismatch",
       "qk-dtype-mismatch", "q-not-4d", "mask-wrong-shape", "bias-wrong-shape", "odd-head-size-rope", "integer-q",
       "bad-reduction", "bad-backend"]


@pytest.mark.parametrize(**bad_input_params([(n, *_bad(n)) for n in BAD]))
def test_bad_input(call, exc, message):
    assert_raises_with(call, exc, message)


def test_labels_on_another_device_is_an_error():
    q = torch.randn(1, 4, 1, 4, device="meta")
    with pytest.raises(ValueError, match="labels must be on q's device"):
        GPL(q, q, torch.tensor([[0, 0, 0, 1]]), backend="reference")


# ----------------------------------------------------------------------------------------------
# The logits, decoding, the row losses and the modules.

def _logits_and_grads(q, k, mask, kw, backend, gout, dtype=None):
    """Logits and the gradients of q, k and the biases for the upstream gradient gout on valid spans."""
    leaves, kw = _leaves(q, k, kw, dtype)
    out = kxops.global_pointer(*leaves[:2], mask, backend=backend, **kw)
    g = torch.where(torch.isfinite(out), gout.to(out.dtype), torch.zeros((), dtype=out.dtype, device=out.device))
    gs = torch.autograd.grad(out, leaves, g)
    return (out, *gs)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(**LOGITS)
def test_logits_and_gradients_match_reference(backend, device, dtype, case):
    q, k, _, mask, kw = _case(case, dtype, device)
    B, L = q.shape[0], q.shape[1]
    H = kw["start_bias"].shape[1] if "start_bias" in kw else q.shape[2]
    gout = torch.randn(B, H, L, L, generator=torch.Generator().manual_seed(3)).to(device)
    got = _logits_and_grads(q, k, mask, kw, backend, gout)
    ref64 = _logits_and_grads(q, k, mask, kw, "reference", gout, torch.float64)
    reflp = _logits_and_grads(q, k, mask, kw, "reference", gout)
    assert got[0].dtype == torch.float32 and got[0].shape == (B, H, L, L)
    assert torch.equal(torch.isinf(got[0]), torch.isinf(ref64[0])), "the invalid spans differ"
    fin = torch.isfinite(ref64[0])
    assert_close_to_ref(got[0][fin], ref64[0][fin], reflp[0][fin], "logits")
    for i, name in enumerate(["dq", "dk", "dstart", "dend"][:len(got) - 1]):
        assert_close_to_ref(got[i + 1], ref64[i + 1], reflp[i + 1], name)


@pytest.mark.parametrize("case", ["B2-L7-H3-d6-sparse", "types1-mask-padding-row", "efficient-biases",
                                  "dense-soft-no-tril"])
@pytest.mark.parametrize(**DECODE)
def test_decode_returns_the_spans_above_threshold(backend, device, case):
    q, k, _, mask, kw = _case(case, torch.float32, device)
    for thr in (0.0, 0.7):
        spans, scores = kxops.global_pointer_decode(q, k, mask, threshold=thr, backend=backend, **kw)
        logits = kxops.global_pointer(q, k, mask, backend=backend, **kw)
        want = (logits > thr).nonzero()
        assert spans.dtype == torch.int64 and torch.equal(spans, want)
        torch.testing.assert_close(scores, logits[tuple(want.T)], rtol=0, atol=0)
        # and the reference's spans, away from the threshold
        ref = gp.global_pointer_logits(q.double(), k.double(), mask, **{n: v.double() if torch.is_tensor(v) else v
                                                                        for n, v in kw.items()})
        clear = (ref - thr).abs() > 1e-4
        assert torch.equal((logits > thr) & clear, (ref > thr) & clear)


def test_decode_of_nothing():
    q = torch.full((1, 4, 2, 4), 0.0)
    spans, scores = kxops.global_pointer_decode(q, q, threshold=1.0)
    assert spans.shape == (0, 4) and scores.shape == (0,)


def _rows(dtype, device):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 13, generator=g) * 3).to(dtype).to(device)
    t = (torch.rand(6, 13, generator=g) < 0.25).float()
    t[1] = 0  # no positive
    t[2] = 1  # only positives
    x[3, 0] = float("-inf")  # a positive at -inf
    t[3, 0] = 1
    x[4] = float("-inf")  # all masked
    t[5] = torch.rand(13, generator=g)  # soft labels
    t[5, :3] = torch.tensor([0.0, 1.0, 0.5])
    return x, t.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize(**ROWS)
def test_row_loss_matches_reference(backend, device, dtype):
    x, t = _rows(dtype, device)
    gout = torch.randn(6, generator=torch.Generator().manual_seed(4)).to(device)

    def run(x, be):
        x = x.detach().requires_grad_()
        loss = kxops.multilabel_categorical_crossentropy(x, t, reduction="none", backend=be)
        return loss, torch.autograd.grad(loss, x, gout.to(loss.dtype))[0]
    got, ref64, reflp = run(x, backend), run(x.double(), "reference"), run(x, "reference")
    for i, name in enumerate(("loss", "dx")):
        assert torch.isfinite(got[i]).all(), name
        assert_close_to_ref(got[i], ref64[i], reflp[i], name)
    assert got[0][4] == 0 and (got[1][4] == 0).all()  # an all-masked row
    assert got[1][3, 0] == 0  # the positive at -inf


@pytest.mark.parametrize("mask_zero", [False, True])
@pytest.mark.parametrize(**ROWS)
def test_sparse_row_loss_equals_dense(backend, device, mask_zero):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 11, generator=g).to(device)
    pos = torch.randint(0, 11, (2, 3, 4), generator=g)
    pos[0, 0, 1] = pos[0, 0, 0]  # duplicate
    pos[1, 2] = 0  # padding only (mask_zero) / class 0 (otherwise)
    pos = pos.to(device)
    xs = x.clone().requires_grad_()
    a = kxops.sparse_multilabel_categorical_crossentropy(xs, pos, mask_zero=mask_zero, reduction="none",
                                                          backend=backend)
    (ga,) = torch.autograd.grad(a.sum(), xs)
    dense = gp.positives_to_dense(pos.cpu(), 11, mask_zero).to(device)
    xd = x.clone()
    if mask_zero:
        xd[..., 0] = float("-inf")
    xd.requires_grad_()
    b = kxops.multilabel_categorical_crossentropy(xd, dense, reduction="none", backend=backend)
    (gb,) = torch.autograd.grad(b.sum(), xd)
    assert a.shape == (2, 3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_row_loss_reductions_and_bad_input():
    x, t = _rows(torch.float32, "cpu")
    MLCE, SMLCE = kxops.multilabel_categorical_crossentropy, kxops.sparse_multilabel_categorical_crossentropy
    rows = MLCE(x, t, reduction="none")
    torch.testing.assert_close(MLCE(x, t), rows.mean())
    torch.testing.assert_close(MLCE(x, t, reduction="sum"), rows.sum())
    assert_raises_with(lambda: MLCE(x, t[:, :5]), ValueError, "targets must have logits' shape")
    assert_raises_with(lambda: MLCE(x, t * 2), ValueError, "targets must be in [0, 1]")
    assert_raises_with(lambda: MLCE(x.int(), t), TypeError, "logits must be a floating-point tensor")
    assert_raises_with(lambda: SMLCE(x, torch.tensor([[13]] * 6)), ValueError, "positive_indices must be in [0, 13)")
    assert_raises_with(lambda: SMLCE(x, torch.zeros(5, 2, dtype=torch.long)), ValueError,
                       "positive_indices must be (..., P) with logits' leading dims")
    assert_raises_with(lambda: SMLCE(x, torch.zeros(6, 2)), TypeError, "positive_indices must be an integer tensor")


def test_row_loss_gradcheck_cpu():
    x, t = _rows(torch.float64, "cpu")
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kxops.multilabel_categorical_crossentropy(x, t, reduction="none",
                                                                                        backend="cpu"), (x,))


def test_opcheck_cpu_logits_and_rows():
    q, k, _, mask, kw = _case("efficient-biases", torch.float32, "cpu")
    from kxops.reference.rope import rope_schedule
    args = (q.requires_grad_(), k, mask, kw["start_bias"], kw["end_bias"], rope_schedule(8, dtype=torch.float32)[0],
            3, 8 ** -0.5, True)
    opcheck(torch.ops.kxops.global_pointer.default, args)
    x, t = _rows(torch.float32, "cpu")
    opcheck(torch.ops.kxops.multilabel_categorical_crossentropy.default, (x.requires_grad_(), t, None, False))
    pos = torch.randint(0, 13, (6, 3))
    opcheck(torch.ops.kxops.multilabel_categorical_crossentropy.default, (x, None, pos, True))


# bert4torch's modules, written here from the spec's formulas with the same parameter names and layouts
# (bert4torch/layers/global_point.py): a state_dict loads unchanged and the logits agree on valid spans.
def _b4t_rope(x):  # interleaved pairs ('adjacent'), positions 0..L-1 along dim 1, base 10000
    L, d = x.shape[1], x.shape[-1]
    ang = torch.arange(L, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos = ang.cos().repeat_interleave(2, -1).to(x.dtype)
    sin = ang.sin().repeat_interleave(2, -1).to(x.dtype)
    shape = (1, L) + (1,) * (x.dim() - 3) + (d,)
    x2 = torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape_as(x)
    return x * cos.view(shape) + x2 * sin.view(shape)


class _B4tGlobalPointer(torch.nn.Module):
    def __init__(self, hidden_size, heads, head_size):
        super().__init__()
        self.heads, self.head_size = heads, head_size
        self.dense = torch.nn.Linear(hidden_size, heads * head_size * 2)

    def forward(self, x, mask):
        y = torch.stack(torch.chunk(self.dense(x), self.heads, dim=-1), dim=-2)
        qw, kw = _b4t_rope(y[..., :self.head_size]), _b4t_rope(y[..., self.head_size:])
        logits = torch.einsum("bmhd,bnhd->bhmn", qw, kw)
        m = mask[:, None]
        logits = logits.masked_fill(~m[..., :, None].bool(), float("-inf")).masked_fill(~m[..., None, :].bool(),
                                                                                          float("-inf"))
        logits = logits - torch.tril(torch.ones_like(logits), -1) * 1e12
        return logits / self.head_size ** 0.5


class _B4tEfficientGlobalPointer(torch.nn.Module):
    def __init__(self, hidden_size, heads, head_size):
        super().__init__()
        self.heads, self.head_size = heads, head_size
        self.p_dense = torch.nn.Linear(hidden_size, head_size * 2)
        self.q_dense = torch.nn.Linear(head_size * 2, heads * 2)

    def forward(self, x, mask):
        y = self.p_dense(x)
        qw, kw = _b4t_rope(y[..., :self.head_size]), _b4t_rope(y[..., self.head_size:])
        logits = torch.einsum("bmd,bnd->bmn", qw, kw) / self.head_size ** 0.5
        bias = torch.stack(torch.chunk(self.q_dense(y), self.heads, dim=-1), dim=-2).transpose(1, 2) / 2
        logits = logits.unsqueeze(1) + bias[..., :1] + bias[..., 1:].transpose(2, 3)
        m = mask[:, None]
        logits = logits.masked_fill(~m[..., :, None].bool(), float("-inf")).masked_fill(~m[..., None, :].bool(),
                                                                                          float("-inf"))
        return logits - torch.tril(torch.ones_like(logits), -1) * 1e12


@pytest.mark.parametrize("module", ["GlobalPointer", "EfficientGlobalPointer"])
def test_modules_load_bert4torch_state_dicts_and_agree(module):
    torch.manual_seed(11)
    theirs = {"GlobalPointer": _B4tGlobalPointer, "EfficientGlobalPointer": _B4tEfficientGlobalPointer}[module](
        24, 3, 8).double()
    ours = getattr(kxops.nn, module)(24, 3, 8).double()
    ours.load_state_dict(theirs.state_dict())  # strict: same names, same shapes
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    a, b = ours(x, mask), theirs(x, mask)
    valid = torch.isfinite(a)
    assert torch.equal(valid, (b > -1e11))  # kxops' -inf: their -inf and -1e12 below the diagonal
    torch.testing.assert_close(a[valid], b[valid])
    spans = torch.tensor([[0, 1, 2, 4], [1, 2, 0, 5], [1, 0, 3, 3]])
    loss = ours.loss(x, mask, spans)
    torch.testing.assert_close(loss, gp.multilabel_categorical_crossentropy(
        a.reshape(2, 3, -1), gp.span_labels_to_dense(spans, 2, 3, 9, "cpu").reshape(2, 3, -1).double()))
    got, scores = ours.decode(x, mask)
    assert torch.equal(got, (a > 0).nonzero())
