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
