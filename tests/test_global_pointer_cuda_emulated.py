"""The CUDA kernels of csrc/cuda/global_pointer_cuda.cu, compiled for the host by tools/cuda_emulate.py
(threads as fibers, tensor cores through the emulator's nvcuda::wmma), against the reference on the
kernel contract's normalised arguments (docs/global_pointer_kernel_contract.md: `loss_ref`).

The ops are called directly (torch.ops.kxops_emu.global_pointer_loss*, on CPU tensors) and held to the
project's rule max|out - ref64| <= 2 max|ref_lp - ref64| + floor, ref64 the reference on float64 copies of
q and k, ref_lp the reference in the test dtype, gradients from the reference's autograd for a random
dloss. The loss, lse_neg, lse_pos and the bias gradients are float32 whatever q's dtype, as the
reference's are (it computes in float32 from 16-bit q, k): they are held to the float32 rule, which the
tensor-core path meets by exact bf16 splits of its operands. dq, dk are in q's dtype. Sizes stay small
(the emulator runs a block's threads one after another); on a GPU machine the real kernel is tested
through the public API instead.
"""
import os
import sys

import pytest
import torch

from kxops.reference import global_pointer as gp
from testing import HAS_CUDA, assert_close_to_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import cuda_emulate  # noqa: E402

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the real CUDA kernel is tested through kxops"),
    pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None, reason="CUDA headers not found (set CUDA_HOME)"),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ARGS = ("mask", "start_bias", "end_bias", "inv_freq", "H", "scale", "tril", "pos_offsets", "pos_index", "targets")


@pytest.fixture(scope="module")
def ops():
    return cuda_emulate.load("global_pointer")


def make_case(dtype, B=2, L=19, H=3, Hq=None, d=10, rope=True, mask="pad", bias="both", labels="sparse", tril=True,
              strided=False, big=1.0, scale=None, targets_dtype=torch.float32, seed=0):
    """Normalised arguments (a dict in the ops' order after q, k) and dloss. mask: None; "pad" (the second
    sequence 4 tokens shorter, a third of padding only when B >= 3); "holes" (random). labels: "sparse"
    (CSR rows of random spans, valid and invalid alike), "dense" (0 / 1), "soft" (in [0, 1] with exact 0s
    and 1s)."""
    g = torch.Generator().manual_seed(seed)
    Hq = H if Hq is None else Hq

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    if strided:  # views of one fused (B, Hq, L, 2 d + 3) tensor, time and heads swapped
        qk = (rnd(B, Hq, L, 2 * d + 3) * big).to(dtype).transpose(1, 2)
        q, k = qk[..., :d], qk[..., d + 1:2 * d + 1]
    else:
        q, k = (rnd(B, L, Hq, d) * big).to(dtype), (rnd(B, L, Hq, d) * big).to(dtype)
    c = dict(q=q, k=k, mask=None, start_bias=None, end_bias=None, inv_freq=None, H=H,
             scale=d ** -0.5 if scale is None else scale, tril=tril, pos_offsets=None, pos_index=None, targets=None)
    if mask == "pad":
        m = torch.ones(B, L, dtype=torch.bool)
        if B >= 2:
            m[1, max(L - 4, 1):] = False
        if B >= 3:
            m[2] = False
        c["mask"] = m
    elif mask == "holes":
        c["mask"] = torch.rand(B, L, generator=g) < 0.8
    if bias in ("both", "start"):
        c["start_bias"] = rnd(B, H, L)
    if bias in ("both", "end"):
        c["end_bias"] = rnd(B, H, L)
    if rope:
        c["inv_freq"] = 1.0 / 100.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if labels == "sparse":
        rows = []
        for _ in range(B * H):
            n = int(torch.randint(0, min(L * L, 7) + 1, (1,), generator=g))
            rows.append(torch.randperm(L * L, generator=g)[:n].sort().values)
        c["pos_offsets"] = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).to(torch.int32)
        c["pos_index"] = torch.cat(rows).to(torch.int32)
    elif labels == "dense":
        c["targets"] = (torch.rand(B, H, L, L, generator=g) < 0.1).to(targets_dtype)
    else:
        t = torch.rand(B, H, L, L, generator=g)
        u = torch.rand(B, H, L, L, generator=g)
        t[u < 0.3] = 0.0
        t[u > 0.9] = 1.0
        c["targets"] = t.to(targets_dtype)
    return c, rnd(B, H)


def call_args(c):
    return [c[a] for a in ARGS]


def ref_loss(c, q, k, biases=None):
    kw = dict(c, q=q, k=k)
    if biases is not None:
        kw["start_bias"], kw["end_bias"] = biases
    return gp.loss_ref(*(kw[a] for a in ("q", "k") + ARGS))


def check_forward(ops, c):
    out = ops.global_pointer_loss(c["q"], c["k"], *call_args(c))
    r64 = ref_loss(c, c["q"].double(), c["k"].double())
    rlp = ref_loss(c, c["q"], c["k"])
    for name, o, a, b in zip(("loss", "lse_neg", "lse_pos"), out, r64, rlp):
        assert o.dtype == torch.float32 and o.shape == a.shape, name
        assert_close_to_ref(o, a, b, name)
    return out


def ref_grads(c, dloss, cast):
    """The reference's gradients of q, k, start_bias, end_bias (None where a bias is absent) for dloss."""
    q, k = cast(c["q"]).detach().requires_grad_(), cast(c["k"]).detach().requires_grad_()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    biases = [None if c[n] is None else c[n].to(acc).requires_grad_() for n in ("start_bias", "end_bias")]
    loss = ref_loss(c, q, k, biases)[0]
    leaves = [q, k] + [x for x in biases if x is not None]
    gs = list(torch.autograd.grad(loss, leaves, dloss.to(loss.dtype)))
    return gs[:2] + [None if x is None else gs.pop(2) for x in biases]


def check_case(ops, c, dloss, backward=True):
    _, lse_neg, lse_pos = check_forward(ops, c)
    if not backward:
        return
    got = ops.global_pointer_loss_backward(dloss, c["q"], c["k"], *call_args(c), lse_neg, lse_pos)
    g64, glp = ref_grads(c, dloss, lambda t: t.double()), ref_grads(c, dloss, lambda t: t)
    for name, o, a, b in zip(("dq", "dk", "dstart", "dend"), got, g64, glp):
        if a is None:  # no bias: an empty float32 tensor
            assert o.dtype == torch.float32 and o.shape == (0,), name
            continue
        assert o.shape == a.shape and o.is_contiguous(), name
        assert_close_to_ref(o, a, b, name)


# The matrix: label form x tril x RoPE x dtype; biases, mask and Hq = 1 alternate so that each meets every
# value of the others. B = 3 with the padding mask: the third sequence is padding only.
MATRIX = []
for li, labels in enumerate(("sparse", "dense", "soft")):
    for ti, tril in enumerate((True, False)):
        for ri, rope in enumerate((True, False)):
            for di, dname in enumerate(("fp32", "bf16")):
                bias = ("both", "none", "start", "end")[(li + ti + ri + di) % 4]
                mask = (None, "pad", "holes")[(li + ri + di) % 3]
                shared = (li + ti + di) % 2 == 1
                MATRIX.append(pytest.param(
                    dict(labels=labels, tril=tril, rope=rope, bias=bias, mask=mask, Hq=1 if shared else None),
                    dname, id="-".join([labels, "tril" if tril else "full", "rope" if rope else "norope",
                                        f"bias_{bias}", f"mask_{mask}", "Hq1" if shared else "HqH", dname])))


@pytest.mark.parametrize("kw, dname", MATRIX)
def test_matches_reference(ops, kw, dname):
    c, dloss = make_case(DTYPES[dname], B=3, L=19, H=3, d=10, **kw)
    check_case(ops, c, dloss)


# Sizes: one token; a tile's worth less some (tiles of 16, 32, 64 by L); two 64-row tiles; head dims 6, 10,
# 64, and an odd one without RoPE.
@pytest.mark.parametrize("dname", ["fp32", "bf16"])
@pytest.mark.parametrize("shape, kw", [
    (dict(B=2, L=1, H=2, d=6), dict()),
    (dict(B=2, L=7, H=2, d=10), dict(labels="soft")),
    (dict(B=1, L=19, H=2, d=64), dict(labels="dense", tril=False)),
    (dict(B=2, L=70, H=1, d=6), dict(labels="sparse")),
    (dict(B=2, L=9, H=2, d=5), dict(rope=False, labels="soft")),
], ids=["L1-d6", "L7-d10", "L19-d64", "L70-d6", "L9-d5-norope"])
def test_sizes(ops, shape, kw, dname):
    c, dloss = make_case(DTYPES[dname], **shape, **kw)
    check_case(ops, c, dloss)


def test_fp16(ops):
    # fp16 inputs go to the tensor cores as two exact bf16 pieces (three when rotated)
    for rope in (True, False):
        c, dloss = make_case(torch.float16, B=2, L=19, H=2, d=10, rope=rope, labels="soft")
        check_case(ops, c, dloss)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_shared_qk_many_types(ops, dname):
    # Efficient GlobalPointer: Hq = 1 shared by H = 10 types, two type groups in the forward; dq, dk sum
    # the types' gradients
    c, dloss = make_case(DTYPES[dname], B=2, L=12, H=10, Hq=1, d=6, labels="sparse", mask="holes")
    check_case(ops, c, dloss)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_strided_inputs(ops, dname):
    c, dloss = make_case(DTYPES[dname], B=2, L=19, H=3, d=10, strided=True, labels="soft", tril=False)
    assert not c["q"].is_contiguous() and c["q"].stride(-1) == 1
    check_case(ops, c, dloss)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_large_scores(ops, dname):
    # scores in the tens: the online log-sum-exps start from the threshold class and rescale
    c, dloss = make_case(DTYPES[dname], B=2, L=19, H=2, d=10, big=6.0, labels="dense")
    loss = check_forward(ops, c)[0]
    assert loss.max() > 50
    check_case(ops, c, dloss)


@pytest.mark.parametrize("targets_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=["f64", "bf16", "f16"])
def test_target_dtypes(ops, targets_dtype):
    c, dloss = make_case(torch.float32, B=2, L=7, H=2, d=6, labels="soft", targets_dtype=targets_dtype)
    check_case(ops, c, dloss)


def test_small_tiles_and_grid_stride(ops, monkeypatch):
    # less shared memory: with d = 128, 16-row tiles (bf16; fp32's backward) and 32-row ones (fp32's
    # forward), three or two i-blocks per row of L = 40 whose (m, l) pairs are combined; two blocks walk
    # every launch's work items
    monkeypatch.setenv("KXOPS_EMU_SMEM_OPTIN", str(48 * 1024))
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "2")
    for dname in ("fp32", "bf16"):
        c, dloss = make_case(DTYPES[dname], B=2, L=40, H=2, d=128, labels="sparse", mask="pad")
        check_case(ops, c, dloss)


def test_labels_on_invalid_spans_add_nothing(ops):
    # positives below the diagonal and on padding: the same loss as without them
    c, _ = make_case(torch.float32, B=2, L=7, H=1, d=6, labels="sparse")
    L = 7
    c["pos_offsets"] = torch.tensor([0, 2, 4], dtype=torch.int32)
    c["pos_index"] = torch.tensor([1 * L + 2, 3 * L + 1, 2 * L + 2, 5 * L + 6], dtype=torch.int32)
    loss = check_forward(ops, c)[0]
    c["pos_offsets"] = torch.tensor([0, 1, 2], dtype=torch.int32)  # seq 1 has 3 tokens: (5, 6) is padding
    c["pos_index"] = torch.tensor([1 * L + 2, 2 * L + 2], dtype=torch.int32)
    assert torch.equal(loss, ops.global_pointer_loss(c["q"], c["k"], *call_args(c))[0])


def test_empty_batch(ops):
    c, dloss = make_case(torch.float32, B=0, L=5, H=2, d=6, labels="dense", mask=None)
    loss, ln, lp = ops.global_pointer_loss(c["q"], c["k"], *call_args(c))
    assert loss.shape == (0, 2)
    dq, dk, ds, de = ops.global_pointer_loss_backward(dloss, c["q"], c["k"], *call_args(c), ln, lp)
    assert dq.shape == (0, 5, 2, 6) and ds.shape == (0, 2, 5)
    # a shared q / k (Hq = 1) for no types: no loss, zero gradients
    c, dloss = make_case(torch.float32, B=2, L=5, H=0, Hq=1, d=6, labels="dense", mask=None, bias="none")
    loss, ln, lp = ops.global_pointer_loss(c["q"], c["k"], *call_args(c))
    assert loss.shape == (2, 0)
    dq, dk, _, _ = ops.global_pointer_loss_backward(dloss, c["q"], c["k"], *call_args(c), ln, lp)
    assert (dq == 0).all() and (dk == 0).all()


def test_bad_offsets_do_not_crash(ops):
    c, _ = make_case(torch.float32, B=2, L=7, H=1, d=6, labels="sparse")
    c["pos_offsets"] = torch.tensor([0, 40, -3], dtype=torch.int32)
    loss, _, _ = ops.global_pointer_loss(c["q"], c["k"], *call_args(c))
    assert loss.isfinite().all()


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.randn(2, 7, 1, 6, dtype=torch.float64)), "float64 is supported on CPU only"),
    (dict(k=torch.randn(2, 7, 1, 6).half()), "k must have q's dtype"),
    (dict(k=torch.randn(2, 6, 1, 6)), "k must have q's shape"),
    (dict(H=2, q=torch.randn(2, 7, 3, 6), k=torch.randn(2, 7, 3, 6)), "heads or 1"),
    (dict(q=torch.randn(2, 7, 1, 300), k=torch.randn(2, 7, 1, 300), inv_freq=None), "head dim must be in [1, 256]"),
    (dict(q=torch.randn(2, 7, 1, 12)[..., ::2]), "unit stride in the last dimension"),
    (dict(mask=torch.ones(2, 7)), "mask must be a contiguous bool"),
    (dict(start_bias=torch.randn(2, 1, 6)), "start_bias must be a contiguous float32"),
    (dict(inv_freq=torch.ones(4)), "inv_freq must be a contiguous float32"),
    (dict(targets=torch.zeros(2, 1, 7, 7)), "exactly one of them"),
    (dict(pos_index=None), "pos_offsets and pos_index must be given together"),
    (dict(pos_offsets=torch.zeros(2, dtype=torch.int32)), "pos_offsets must be a contiguous int32"),
], ids=["fp64", "k-dtype", "k-shape", "heads", "d300", "last-stride", "mask-dtype", "bias-shape", "inv-freq",
        "two-label-forms", "pos-half", "pos-offsets-shape"])
def test_bad_arguments_raise(ops, change, message):
    c, _ = make_case(torch.float32, B=2, L=7, H=1, d=6, labels="sparse", mask=None)
    c.update(change)
    with pytest.raises(RuntimeError) as info:
        ops.global_pointer_loss(c["q"], c["k"], *call_args(c))
    assert message in str(info.value)


def test_bad_backward_arguments_raise(ops):
    c, dloss = make_case(torch.float32, B=2, L=7, H=1, d=6, labels="sparse")
    _, ln, lp = ops.global_pointer_loss(c["q"], c["k"], *call_args(c))
    with pytest.raises(RuntimeError, match="dloss must be a float32"):
        ops.global_pointer_loss_backward(dloss.double(), c["q"], c["k"], *call_args(c), ln, lp)
    with pytest.raises(RuntimeError, match="lse_pos must be a float32"):
        ops.global_pointer_loss_backward(dloss, c["q"], c["k"], *call_args(c), ln, lp[:1])


# ---------------------------------------------------------------------------------------------
# The span logits (kxops::global_pointer), their backward and decoding, against `logits_ref` /
# `decode_ref`. Logits: the -inf pattern exactly, the finite entries under the float32 rule. Backward: the
# reference's autograd for a random dlogits that is NaN on the invalid spans (never to be read). Decoding:
# exactly the spans where this backend's own logits exceed the threshold, with those logits as scores, and
# the reference's spans wherever its logit is not within 1e-5 of the threshold.

SCORE_ARGS = ("mask", "start_bias", "end_bias", "inv_freq", "H", "scale", "tril")


def score_args(c):
    return [c[a] for a in SCORE_ARGS]


def ref_logits(c, q, k, biases=None):
    kw = dict(c)
    if biases is not None:
        kw["start_bias"], kw["end_bias"] = biases
    return gp.logits_ref(q, k, *(kw[a] for a in SCORE_ARGS))


def ref_logit_grads(c, dlogits, cast):
    q, k = cast(c["q"]).detach().requires_grad_(), cast(c["k"]).detach().requires_grad_()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    biases = [None if c[n] is None else c[n].to(acc).requires_grad_() for n in ("start_bias", "end_bias")]
    out = ref_logits(c, q, k, biases)
    leaves = [q, k] + [x for x in biases if x is not None]
    gs = list(torch.autograd.grad(out, leaves, dlogits.to(out.dtype)))
    return gs[:2] + [None if x is None else gs.pop(2) for x in biases]


def check_logits(ops, c):
    out = ops.global_pointer(c["q"], c["k"], *score_args(c))
    r64, rlp = ref_logits(c, c["q"].double(), c["k"].double()), ref_logits(c, c["q"], c["k"])
    assert out.dtype == torch.float32 and out.shape == r64.shape and out.is_contiguous()
    valid = torch.isfinite(r64)
    assert torch.equal(out == float("-inf"), ~valid), "logits: -inf exactly on the invalid spans"
    assert_close_to_ref(out[valid], r64[valid], rlp[valid], "logits")
    return out, rlp


def check_logits_backward(ops, c, seed=0):
    B, L, H = c["q"].shape[0], c["q"].shape[1], c["H"]
    dlogits = torch.randn(B, H, L, L, generator=torch.Generator().manual_seed(seed))
    invalid = ~gp.valid_spans(L, c["mask"], c["tril"], "cpu").expand(B, H, L, L)
    dlogits[invalid] = float("nan")  # never read
    got = ops.global_pointer_backward(dlogits, c["q"], c["k"], *score_args(c))
    g64, glp = ref_logit_grads(c, dlogits, lambda t: t.double()), ref_logit_grads(c, dlogits, lambda t: t)
    for name, o, a, b in zip(("dq", "dk", "dstart", "dend"), got, g64, glp):
        if a is None:  # no bias: an empty float32 tensor
            assert o.dtype == torch.float32 and o.shape == (0,), name
            continue
        assert o.shape == a.shape and o.dtype == b.dtype and o.is_contiguous(), name
        assert_close_to_ref(o, a, b, name)
    storages = {t.untyped_storage()._cdata for t in got}
    assert len(storages) == 4, "the outputs alias"


def check_decode(ops, c, logits, rlp, threshold, expect_hits=True):
    spans, scores = ops.global_pointer_decode(c["q"], c["k"], *score_args(c), threshold)
    hit = logits > threshold
    assert spans.dtype == torch.int64 and scores.dtype == torch.float32
    assert spans.shape == (int(hit.sum()), 4) and scores.shape == (int(hit.sum()),)
    assert torch.equal(spans, hit.nonzero()), "decode: the spans where the logits exceed the threshold"
    assert torch.equal(scores, logits[hit]), "decode: the scores are the logits"
    if expect_hits:
        assert hit.any() and (~hit & torch.isfinite(logits)).any(), "a threshold that splits the spans"
    rs, rsc = gp.decode_ref(c["q"], c["k"], *score_args(c), threshold)
    ref_hit = torch.zeros_like(hit)
    ref_hit[tuple(rs.t())] = True
    near = (rlp - threshold).abs() <= 1e-5
    assert ((hit == ref_hit) | near).all(), "decode: the reference's spans away from the threshold"


def check_scores_case(ops, c, thresholds=(0.0,), seed=0):
    logits, rlp = check_logits(ops, c)
    check_logits_backward(ops, c, seed)
    for t in thresholds:
        check_decode(ops, c, logits, rlp, t)


SCORE_MATRIX = []
for ti, tril in enumerate((True, False)):
    for ri, rope in enumerate((True, False)):
        for di, dname in enumerate(("fp32", "bf16")):
            bias = ("both", "none", "start", "end")[(ti + 2 * ri + di) % 4]
            mask = (None, "pad", "holes")[(ti + 2 * ri + di) % 3]
            shared = (ti + ri + di) % 2 == 1
            SCORE_MATRIX.append(pytest.param(
                dict(tril=tril, rope=rope, bias=bias, mask=mask, Hq=1 if shared else None), dname,
                id="-".join(["tril" if tril else "full", "rope" if rope else "norope", f"bias_{bias}", f"mask_{mask}",
                             "Hq1" if shared else "HqH", dname])))


@pytest.mark.parametrize("kw, dname", SCORE_MATRIX)
def test_logits_matches_reference(ops, kw, dname):
    c, _ = make_case(DTYPES[dname], B=3, L=19, H=3, d=10, labels="dense", **kw)
    check_scores_case(ops, c, thresholds=(0.0, 1.0))


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
@pytest.mark.parametrize("shape, kw", [
    (dict(B=2, L=1, H=2, d=6), dict()),
    (dict(B=2, L=70, H=1, d=6), dict(bias="start")),
    (dict(B=1, L=19, H=2, d=64), dict(tril=False, Hq=1)),
    (dict(B=1, L=9, H=2, d=256), dict(mask="holes")),
    (dict(B=2, L=9, H=2, d=5), dict(rope=False, tril=False)),
    (dict(B=2, L=7, H=2, d=1), dict(rope=False, Hq=1)),
], ids=["L1-d6", "L70-d6", "L19-d64", "L9-d256", "L9-d5-norope", "L7-d1-norope"])
def test_logits_sizes(ops, shape, kw, dname):
    c, _ = make_case(DTYPES[dname], labels="dense", **shape, **kw)
    logits, rlp = check_logits(ops, c)
    check_logits_backward(ops, c)
    check_decode(ops, c, logits, rlp, 0.0, expect_hits=shape["L"] > 1)


def test_logits_fp16(ops):
    for rope in (True, False):
        c, _ = make_case(torch.float16, B=2, L=19, H=2, d=10, rope=rope, labels="dense")
        check_scores_case(ops, c)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_logits_shared_qk_many_types(ops, dname):
    # Hq = 1 for H = 10 types: two type groups a score tile; dq, dk sum the types' gradients
    c, _ = make_case(DTYPES[dname], B=2, L=12, H=10, Hq=1, d=6, labels="dense", mask="holes")
    check_scores_case(ops, c, thresholds=(0.5,))


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_logits_strided_inputs(ops, dname):
    c, _ = make_case(DTYPES[dname], B=2, L=19, H=3, d=10, strided=True, labels="dense", tril=False)
    assert not c["q"].is_contiguous() and c["q"].stride(-1) == 1
    check_scores_case(ops, c)


def test_logits_small_tiles_and_grid_stride(ops, monkeypatch):
    # 48 KB of shared memory with d = 128: 16- or 32-row tiles, several i-blocks a row (decode's row
    # offsets carried across j-blocks); two blocks walk every launch's work items
    monkeypatch.setenv("KXOPS_EMU_SMEM_OPTIN", str(48 * 1024))
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "2")
    for dname in ("fp32", "bf16"):
        c, _ = make_case(DTYPES[dname], B=2, L=40, H=2, d=128, labels="dense", mask="pad", tril=dname == "fp32")
        check_scores_case(ops, c)


def test_decode_without_hits(ops):
    c, _ = make_case(torch.float32, B=3, L=7, H=2, d=6, labels="dense")
    spans, scores = ops.global_pointer_decode(c["q"], c["k"], *score_args(c), 1e6)
    assert spans.shape == (0, 4) and spans.dtype == torch.int64 and scores.shape == (0,)
    # every span a hit: all the valid ones, padding (the third sequence) none
    logits, rlp = check_logits(ops, c)
    check_decode(ops, c, logits, rlp, -1e6, expect_hits=False)
    assert int((logits > -1e6).sum()) == int(torch.isfinite(logits).sum())


def test_logits_empty(ops):
    c, _ = make_case(torch.float32, B=0, L=5, H=2, d=6, labels="dense", mask=None)
    assert ops.global_pointer(c["q"], c["k"], *score_args(c)).shape == (0, 2, 5, 5)
    spans, scores = ops.global_pointer_decode(c["q"], c["k"], *score_args(c), 0.0)
    assert spans.shape == (0, 4) and scores.shape == (0,)
    dq, dk, ds, de = ops.global_pointer_backward(torch.zeros(0, 2, 5, 5), c["q"], c["k"], *score_args(c))
    assert dq.shape == (0, 5, 2, 6) and ds.shape == (0, 2, 5)
    # a shared q / k (Hq = 1) for no types: no logits, zero gradients
    c, _ = make_case(torch.float32, B=2, L=5, H=0, Hq=1, d=6, labels="dense", mask=None, bias="none")
    assert ops.global_pointer(c["q"], c["k"], *score_args(c)).shape == (2, 0, 5, 5)
    assert ops.global_pointer_decode(c["q"], c["k"], *score_args(c), 0.0)[0].shape == (0, 4)
    dq, dk, _, _ = ops.global_pointer_backward(torch.zeros(2, 0, 5, 5), c["q"], c["k"], *score_args(c))
    assert dq.shape == (2, 5, 1, 6) and (dq == 0).all() and (dk == 0).all()


def test_logits_bad_arguments_raise(ops):
    c, _ = make_case(torch.float32, B=2, L=7, H=1, d=6, labels="dense")
    with pytest.raises(RuntimeError, match="float64 is supported on CPU only"):
        ops.global_pointer(c["q"].double(), c["k"].double(), *score_args(c))
    with pytest.raises(RuntimeError, match="k must have q's shape"):
        ops.global_pointer_decode(c["q"], c["k"][:, :6], *score_args(c), 0.0)
    with pytest.raises(RuntimeError, match="dlogits must be a contiguous float32"):
        ops.global_pointer_backward(torch.zeros(2, 1, 7, 6), c["q"], c["k"], *score_args(c))
    with pytest.raises(RuntimeError, match="dlogits must be a contiguous float32"):
        ops.global_pointer_backward(torch.zeros(2, 1, 7, 7).double(), c["q"], c["k"], *score_args(c))


# ---------------------------------------------------------------------------------------------
# The row losses on materialised logits (kxops::multilabel_categorical_crossentropy, _backward) against
# `mlce_ref`: loss, lse_neg, lse_pos float32 under the float32 rule; dx in x's dtype against the
# reference's autograd for a random dloss, exactly 0 where x is -inf (and at class 0 under mask_zero).

def make_rows(dtype, R, C, labels, P=4, big=2.0, ninf=0.1, seed=0):
    """x (R, C) with a fraction `ninf` of -inf entries; labels "dense" (0 / 1), "soft" (in [0, 1] with exact 0s
    and 1s) or "sparse" (R, P) random indices (duplicates likely): (x, targets, positives)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, C, generator=g) * big
    x[torch.rand(R, C, generator=g) < ninf] = float("-inf")
    x = x.to(dtype)
    if labels == "dense":
        return x, (torch.rand(R, C, generator=g) < 0.2).float(), None
    if labels == "soft":
        t = torch.rand(R, C, generator=g)
        u = torch.rand(R, C, generator=g)
        t[u < 0.3] = 0.0
        t[u > 0.8] = 1.0
        return x, t, None
    return x, None, torch.randint(0, C, (R, P), generator=g)


def check_rows(ops, x, targets, positives, mask_zero=False, seed=0):
    out = ops.multilabel_categorical_crossentropy(x, targets, positives, mask_zero)
    r64 = gp.mlce_ref(x.double(), targets, positives, mask_zero)
    rlp = gp.mlce_ref(x, targets, positives, mask_zero)
    for name, o, a, b in zip(("loss", "lse_neg", "lse_pos"), out, r64, rlp):
        assert o.dtype == torch.float32 and o.shape == (x.shape[0],), name
        assert_close_to_ref(o, a, b, name)
    dloss = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    dx = ops.multilabel_categorical_crossentropy_backward(dloss, x, targets, positives, mask_zero, out[1], out[2])
    assert dx.dtype == x.dtype and dx.shape == x.shape and dx.is_contiguous()
    grads = []
    for cast in (lambda t: t.double(), lambda t: t):
        leaf = cast(x).detach().requires_grad_()
        loss = gp.mlce_ref(leaf, targets, positives, mask_zero)[0]
        grads.append(torch.autograd.grad(loss, leaf, dloss.to(loss.dtype))[0])
    assert_close_to_ref(dx, grads[0], grads[1], "dx")
    assert (dx[torch.isinf(x)] == 0).all(), "dx at -inf"
    if mask_zero and positives is not None and x.shape[1]:
        assert (dx[:, 0] == 0).all(), "dx at class 0 under mask_zero"
    return out, dx


ROW_MATRIX = [pytest.param(labels, mask_zero, dname, id=f"{labels}{'-mask_zero' if mask_zero else ''}-{dname}")
              for labels, mask_zero in (("dense", False), ("soft", False), ("sparse", False), ("sparse", True))
              for dname in ("fp32", "bf16")]


@pytest.mark.parametrize("labels, mask_zero, dname", ROW_MATRIX)
def test_rows_match_reference(ops, labels, mask_zero, dname):
    x, t, pos = make_rows(DTYPES[dname], R=6, C=37, labels=labels)
    check_rows(ops, x, t, pos, mask_zero)


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
@pytest.mark.parametrize("C, P, mask_zero", [(45, 40, False), (200, 300, True), (9, 1, True)],
                         ids=["P40-sorted-shared", "P300-sorted-global", "P1"])
def test_rows_many_positives(ops, C, P, mask_zero, dname):
    # P <= 32: scanned; 32 < P <= 256: sorted, in shared memory; P > 256: sorted, searched in place
    x, _, pos = make_rows(DTYPES[dname], R=4, C=C, labels="sparse", P=P, seed=3)
    check_rows(ops, x, None, pos, mask_zero)


@pytest.mark.parametrize("labels, dname", [("dense", "bf16"), ("soft", "fp32"), ("sparse", "fp32")])
def test_rows_long(ops, labels, dname):
    # rows of more than 2048 classes: a block of 256 threads a row, its warps' log-sum-exps merged
    x, t, pos = make_rows(DTYPES[dname], R=3, C=5000, labels=labels, P=6, seed=5)
    check_rows(ops, x, t, pos, mask_zero=labels == "sparse")


def test_rows_fp16_and_large_scores(ops):
    x, t, _ = make_rows(torch.float16, R=5, C=30, labels="soft", big=1.0)
    check_rows(ops, x, t, None)
    for dname in ("fp32", "bf16"):  # scores in the tens: the running maxima rescale
        x, t, _ = make_rows(DTYPES[dname], R=5, C=64, labels="dense", big=25.0, seed=7)
        loss = check_rows(ops, x, t, None)[0][0]
        assert loss.max() > 50


@pytest.mark.parametrize("dname", ["fp32", "bf16"])
def test_rows_special(ops, dname):
    ninf = float("-inf")
    C = 9
    x = torch.randn(6, C, generator=torch.Generator().manual_seed(11)) * 2
    t = (torch.rand(6, C, generator=torch.Generator().manual_seed(12)) < 0.3).float()
    x[0, [1, 4]] = ninf            # -inf entries
    t[1] = 0.0                      # no positives
    t[2] = 1.0                      # only positives
    x[3, 2], t[3, 2] = ninf, 1.0    # a positive at -inf
    x[4] = ninf                     # all -inf: loss 0, gradient 0
    x[5, 1:] = ninf                 # one finite entry
    x = x.to(DTYPES[dname])
    (loss, ln, lp), dx = check_rows(ops, x, t, None)
    assert loss[4] == 0 and ln[4] == 0 and lp[4] == 0 and (dx[4] == 0).all()
    assert lp[1] == 0 and ln[2] == 0
    # the same rows as positives (mask_zero: index 0 pads; class 0 no class)
    x0 = torch.cat([torch.zeros(6, 1, dtype=x.dtype), x], 1)
    rows = [[c + 1 for c in range(C) if t[r, c]] for r in range(6)]
    P = max(len(r) for r in rows)
    pos = torch.tensor([r + [0] * (P - len(r)) for r in rows])
    (loss2, _, _), dx2 = check_rows(ops, x0, None, pos, mask_zero=True)
    assert loss2[4] == 0 and (dx2[4] == 0).all()
    assert torch.equal(loss2, loss) and torch.equal(dx2[:, 1:], dx)


def test_rows_grid_stride(ops, monkeypatch):
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "2")
    x, t, _ = make_rows(torch.float32, R=19, C=21, labels="soft", seed=13)
    check_rows(ops, x, t, None)
    x, _, pos = make_rows(torch.bfloat16, R=5, C=3000, labels="sparse", P=3, seed=14)
    check_rows(ops, x, None, pos)


def test_rows_empty(ops):
    for R, C in ((0, 5), (3, 0)):
        x = torch.randn(R, C)
        loss, ln, lp = ops.multilabel_categorical_crossentropy(x, torch.zeros(R, C), None, False)
        assert loss.shape == (R,) and (loss == 0).all()
        dx = ops.multilabel_categorical_crossentropy_backward(torch.ones(R), x, torch.zeros(R, C), None, False, ln, lp)
        assert dx.shape == (R, C)
    x = torch.randn(3, 6)  # no positives at all (P = 0)
    check_rows(ops, x, None, torch.zeros(3, 0, dtype=torch.int64))


@pytest.mark.parametrize("args, message", [
    ((torch.randn(3, 4).double(), torch.zeros(3, 4).double(), None, False), "float64 is supported on CPU only"),
    ((torch.randn(3, 4, 2), torch.zeros(3, 4, 2), None, False), "x must be a contiguous (R, C)"),
    ((torch.randn(4, 3).t(), torch.zeros(3, 4), None, False), "x must be a contiguous (R, C)"),
    ((torch.randn(3, 4), None, None, False), "exactly one of them"),
    ((torch.randn(3, 4), torch.zeros(3, 4), torch.zeros(3, 1, dtype=torch.int64), False), "exactly one of them"),
    ((torch.randn(3, 4), torch.zeros(3, 4).half(), None, False), "targets must be a contiguous float32"),
    ((torch.randn(3, 4), torch.zeros(3, 5), None, False), "targets must be a contiguous float32"),
    ((torch.randn(3, 4), None, torch.zeros(3, 2, dtype=torch.int32), False), "positives must be a contiguous int64"),
    ((torch.randn(3, 4), None, torch.zeros(2, 2, dtype=torch.int64), False), "positives must be a contiguous int64"),
], ids=["fp64", "3d", "strided", "no-labels", "two-labels", "targets-dtype", "targets-shape", "pos-dtype",
        "pos-rows"])
def test_rows_bad_arguments_raise(ops, args, message):
    with pytest.raises(RuntimeError) as info:
        ops.multilabel_categorical_crossentropy(*args)
    assert message in str(info.value)


def test_rows_bad_backward_arguments_raise(ops):
    x, t, _ = make_rows(torch.float32, R=3, C=5, labels="dense")
    _, ln, lp = ops.multilabel_categorical_crossentropy(x, t, None, False)
    with pytest.raises(RuntimeError, match="dloss must be a float32"):
        ops.multilabel_categorical_crossentropy_backward(torch.ones(3).double(), x, t, None, False, ln, lp)
    with pytest.raises(RuntimeError, match="lse_pos must be a float32"):
        ops.multilabel_categorical_crossentropy_backward(torch.ones(3), x, t, None, False, ln, lp[:2])
