"""The CUDA kernel's code, compiled for the host by tools/cuda_emulate.py, against the reference.

CI has no GPU; this runs csrc/cuda/rope_cuda.cu's indexing, vector paths, shared-memory table and
in-place handling on CPU tensors (threads emulated), through the public kxops.rope with the emulated
ops standing in for the cpu backend. Forward only (the emulated ops carry no autograd; the backward is
the same kernel with `conjugate`, checked directly below). On a GPU machine the real kernel is tested
instead.
"""
import os
import sys
import warnings

import pytest
import torch

import kxops
import test_rope as T
from testing import DTYPE_IDS, DTYPES, HAS_CUDA, assert_close_to_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import cuda_emulate  # noqa: E402

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the real CUDA kernel is tested in test_rope.py"),
    pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None, reason="CUDA headers not found (set CUDA_HOME)"),
]

@pytest.fixture(scope="module")
def emu_ops():
    ops = cuda_emulate.load("rope")
    return (ops.rope.default, ops.rope_.default, ops.rope_qk.default, ops.rope_qk_.default)


@pytest.fixture
def cuda_code(emu_ops):
    """backend="cpu" runs the emulated CUDA kernel for the duration of a test: the emulated ops are
    registered over the CPU kernels of kxops::rope* (the dispatcher restores them afterwards)."""
    lib = torch.library.Library("kxops", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel": that is the point
        for name, op in zip(("rope", "rope_", "rope_qk", "rope_qk_"), emu_ops):
            lib.impl(name, op, "CPU")
    try:
        with torch.profiler.profile() as prof:
            kxops.rope(torch.randn(1, 2, 1, 8), backend="cpu")
        assert any(e.name == "kxops_emu::rope" for e in prof.events()), "the emulated kernel did not run"
        yield emu_ops
    finally:
        lib._destroy()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", T.CASES)
def test_forward_matches_reference(cuda_code, case, dtype):
    T.test_forward_matches_reference("cpu", "cpu", case, dtype)


@pytest.mark.parametrize("case", ["B2-S16-H3-D8-half", "heads-slice", "varlen-offsets-interleaved", "2d-halves"])
def test_inplace_writes_through_strides(cuda_code, case):
    T.test_inplace_writes_through_strides("cpu", "cpu", case)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_tail_past_rotary_dim_is_bit_identical(cuda_code, interleaved, dtype):
    T.test_tail_past_rotary_dim_is_bit_identical("cpu", "cpu", interleaved, dtype)


def test_default_positions_alternating_norms_empty(cuda_code):
    T.test_default_positions_equal_arange("cpu", "cpu")
    T.test_alternating_with_equal_coordinates_is_1d_rope("cpu", "cpu")
    T.test_rotation_keeps_norms("cpu", "cpu")
    T.test_empty_inputs("cpu", "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("heads", [(8, 2), (2, 8), (300, 20)], ids=["Hq8-Hk2", "Hq2-Hk8", "Hq300-Hk20"])
def test_rope_qk_matches_reference(cuda_code, heads, interleaved, dtype):
    hq, hk = heads
    q = torch.randn(2, 5, hq, 16, dtype=dtype)
    k = torch.randn(2, 5, hk, 16, dtype=dtype)
    kw = dict(positions=T._pos(2, 5), interleaved=interleaved)
    qo, ko = kxops.rope_qk(q, k, **kw, backend="cpu")
    rq64, rk64 = kxops.rope_qk(q.double(), k.double(), **kw, backend="reference")
    rq, rk = kxops.rope_qk(q, k, **kw, backend="reference")
    assert_close_to_ref(qo, rq64, rq, "q")
    assert_close_to_ref(ko, rk64, rk, "k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_inplace_on_views_of_one_qkv_tensor(cuda_code, dtype):
    qkv = torch.randn(2, 5, 8, 64, dtype=dtype)
    v = qkv[:, :, 6:].clone()
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    (eq64, ek64), (eq, ek) = T._refs(kxops.rope_qk, q, k)
    kxops.rope_qk(q, k, inplace=True, backend="cpu")
    assert_close_to_ref(q, eq64, eq, "q")
    assert_close_to_ref(k, ek64, ek, "k")
    assert torch.equal(qkv[:, :, 6:], v)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_conjugate_is_the_inverse_rotation(cuda_code, interleaved):
    rope, *_ = cuda_code
    x = torch.randn(2, 7, 3, 32)
    pos = T._pos(2, 7, 1)
    inv_freq = kxops.reference.rope_schedule(32, dtype=torch.float32)[0]
    args = (pos, None, 0, None, inv_freq, None, 32, interleaved)
    y = rope(x, *args, True)
    ref64 = kxops.reference.rope_impl.rope_ref(x.double(), pos, inv_freq=inv_freq.double(), interleaved=interleaved,
                                               conjugate=True)
    ref32 = kxops.reference.rope_impl.rope_ref(x, pos, inv_freq=inv_freq, interleaved=interleaved, conjugate=True)
    assert_close_to_ref(y, ref64, ref32)
    torch.testing.assert_close(rope(y, *args, False), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["B1-S423-H7-D16-pos", "varlen", "offsets"])
def test_grid_stride_loop(cuda_code, case, monkeypatch):
    # fewer blocks than token groups: every block walks several groups (what a huge B*S does on a GPU)
    monkeypatch.setenv("KXOPS_EMU_GRID_CAP", "3")
    T.test_forward_matches_reference("cpu", "cpu", case, torch.bfloat16)


def test_large_head_dim_splits_into_chunks(cuda_code):
    # head_dim past the kernel's per-block table (1024 pairs) runs as several blockIdx.y chunks
    for D, R, interleaved in ((2304, 2200, False), (2306, 2202, True)):
        x = torch.randn(1, 2, 2, D)
        kw = dict(rotary_dim=R, interleaved=interleaved)
        assert_close_to_ref(kxops.rope(x, **kw, backend="cpu"), *T._refs(kxops.rope, x, **kw))
