"""tools/cuda_emulate.py on a .cu of its own (tests/cuda/emulate_selftest.cu): the CUDA features it
emulates give torch's results, and its guards fire. The family kernels' own emulated tests
(test_<family>_cuda_emulated.py) rely on both."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELFTEST = os.path.join(ROOT, "tests", "cuda", "emulate_selftest.cu")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_emulate  # noqa: E402

needs_headers = pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None,
                                   reason="CUDA headers not found (set CUDA_HOME)")


@pytest.fixture(scope="module")
def ops():
    return cuda_emulate.load(SELFTEST)


@pytest.fixture(params=[None, "2"], ids=["grid-uncapped", "grid-cap2"])
def grid_cap(request, monkeypatch):
    """KXOPS_EMU_GRID_CAP=2: fewer blocks than rows or chunks, so that every block walks the
    grid-stride loop."""
    if request.param:
        monkeypatch.setenv("KXOPS_EMU_GRID_CAP", request.param)


@needs_headers
@pytest.mark.parametrize("vectorized", [False, True], ids=["scalar", "float4"])
@pytest.mark.parametrize("shape", [(5, 8), (3, 300), (1, 1024)], ids=["5x8", "3x300", "1x1024"])
def test_warp_and_block_reductions(ops, grid_cap, shape, vectorized):
    # kx::block_reduce (__shfl_xor_sync, static __shared__, __syncthreads), __ballot_sync and
    # __syncthreads_count, kx::load_aligned<float4>
    x = torch.randn(shape)
    s, m, npos = ops.row_stats(x, vectorized)
    torch.testing.assert_close(s, x.sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(m, x.amax(1))
    assert torch.equal(npos, (x > 0).sum(1, dtype=torch.int32))


@needs_headers
@pytest.mark.parametrize("shape", [(4, 100), (2, 128), (3, 777)], ids=["4x100", "2x128", "3x777"])
def test_block_prefix_sum(ops, grid_cap, shape):
    # __shfl_up_sync, __shfl_sync, dynamic shared memory, barriers between tiles
    x = torch.randn(shape)
    torch.testing.assert_close(ops.cumsum(x), x.cumsum(1), rtol=1e-5, atol=1e-4)


@needs_headers
@pytest.mark.parametrize("width", [32, 8, 4])
def test_shuffle_source_lanes(ops, width):
    # the PTX rules of shfl.sync: a lane reads within its group of `width` lanes, and a lane past the
    # group (up, down, xor to a later group) keeps its own value
    x = torch.randn(64)
    x[32:] = x[32:].abs() + 0.1  # the second warp: all positive
    lane = torch.arange(64)
    first = lane - lane % width
    inside = lambda src, ok: torch.where(ok, src, lane)  # noqa: E731
    src = torch.stack([first + (lane + 3) % width,
                       inside(lane - 3, lane - 3 >= first),
                       inside(lane + 3, lane + 3 < first + width),
                       inside(lane ^ 5, (lane ^ 5) < first + width)])
    out, votes = ops.shuffles(x, width)
    assert torch.equal(out, x[src])
    warp_pos = (x > 0).view(2, 32)
    assert torch.equal(votes[0], warp_pos.any(1).repeat_interleave(32).int())
    assert torch.equal(votes[1], warp_pos.all(1).repeat_interleave(32).int())
    assert (votes[2] == sum(range(32))).all()


@needs_headers
def test_missing_barrier_gives_a_wrong_result(ops):
    # warps run as far apart as a GPU may let them: without the barrier at the end of a tile, one
    # overwrites the warp totals another has yet to read
    x = torch.randn(2, 777)
    assert not torch.allclose(ops.cumsum(x, tile_barrier=False), x.cumsum(1), rtol=1e-5, atol=1e-4)


@needs_headers
def test_atomics(ops, grid_cap):
    # atomicAdd on int and float, atomicMax; a 2-D block, a grid-stride loop
    idx = torch.randint(0, 37, (5000,))
    w = torch.rand(5000)
    counts, sums, top = ops.bincount(idx, w, 40)
    assert torch.equal(counts, torch.bincount(idx, minlength=40).int())
    torch.testing.assert_close(sums, torch.bincount(idx, w, minlength=40), rtol=1e-5, atol=1e-4)
    assert top.item() == idx.max().item()


@needs_headers
def test_unwritten_outputs_are_poisoned(ops):
    x = torch.randn(1000)
    out, index = ops.copy_even(x)
    assert torch.equal(out[::2], x[::2]) and torch.equal(index[::2], torch.arange(0, 1000, 2, dtype=torch.int32))
    assert out[1::2].isnan().all()
    assert (index[1::2] == torch.iinfo(torch.int32).max).all()


@needs_headers
def test_shared_memory_starts_poisoned(ops):
    assert ops.misuse(torch.empty(0), 2).isnan().all()


@needs_headers
def test_misaligned_vector_load_raises(ops):
    x = torch.randn(3, 9)[:, 1:]  # rows of 8 floats starting 4 bytes past a 16-byte boundary
    assert ops.row_stats(x.contiguous(), True)[0].isfinite().all()
    with pytest.raises(RuntimeError, match=r"kx::load_aligned: address 0x[0-9a-f]+ is not 16-byte aligned"):
        ops.row_stats(x, True)
    ops.row_stats(x.contiguous(), True)  # the emulator is usable after the error


@needs_headers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout", ["rr", "cr", "rc", "cc"], ids=["A-B", "At-B", "A-Bt", "At-Bt"])
@pytest.mark.parametrize("shape", [(16, 16, 16), (48, 32, 80)], ids=["16x16x16", "48x32x80"])
def test_wmma_gemm(ops, shape, layout, dtype):
    # nvcuda::wmma: fragments of A (shared memory) and B (global memory), row- or column-major,
    # mma_sync accumulating over K, elementwise x[i], an accumulator loaded from and stored to memory
    # in either layout. Products of 16-bit values are exact in float: the result is torch's float GEMM
    # up to the order of the float additions.
    M, N, K = shape
    a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
    c = torch.randn(M, N)
    a_col, b_col = layout[0] == "c", layout[1] == "c"
    aa = a.t().contiguous() if a_col else a
    bb = b.t().contiguous() if b_col else b
    expected = 0.5 * (a.double() @ b.double()) + c.double()
    out = ops.wmma_gemm(aa, bb, c, 0.5, a_col, b_col, False)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=K * 2e-6 * expected.abs().max().item())
    out_t = ops.wmma_gemm(aa, bb, c, 0.5, a_col, b_col, True)
    assert torch.equal(out_t.t(), out)


@needs_headers
def test_wmma_without_syncwarp_gives_a_wrong_result(ops):
    # a lane's load_matrix_sync takes the elements it owns when it arrives: staged by other lanes that
    # have not run yet (no __syncwarp), they are still the poison
    a, b = torch.randn(32, 32).half(), torch.randn(32, 32).half()
    c = torch.zeros(32, 32)
    out = ops.wmma_gemm(a, b, c, 1.0, False, False, False, False)
    assert not torch.allclose(out, a.float() @ b.float())


@needs_headers
@pytest.mark.parametrize("what, message", [
    (0, r"threads 0\.\.15: wait in __syncthreads at emulate_selftest\.cu:\d+\n  threads 16\.\.31: returned"),
    (1, r"threads 0\.\.15: wait in __shfl_xor_sync at emulate_selftest\.cu:\d+ with mask 0xffffffff\n"
        r"  threads 16\.\.31: returned"),
    (3, r"invalid configuration argument: block \(2048, 1, 1\)"),
    (4, r"65536 bytes of dynamic shared memory"),
    (5, r"threads 0\.\.15: wait in wmma::load_matrix_sync at emulate_selftest\.cu:\d+ with mask 0xffffffff\n"
        r"  threads 16\.\.31: returned"),
    (6, r"wmma::load_matrix_sync: address 0x[0-9a-f]+ is not 32-byte aligned"),
], ids=["early-return-before-syncthreads", "shuffle-in-half-a-warp", "block-too-large", "smem-without-opt-in",
        "wmma-in-half-a-warp", "wmma-misaligned"])
def test_misuse_raises(ops, what, message):
    with pytest.raises(RuntimeError, match=message):
        ops.misuse(torch.empty(0), what)


def test_schemas_come_from_csrc():
    src = cuda_emulate.host_source("rope")
    assert 'TORCH_LIBRARY_IMPL(kxops_emu, CPU, m)' in src
    assert 'm.def("rope_qk_(Tensor(a!) q, Tensor(b!) k, Tensor? positions,' in src
    assert "<<<" not in src.split("end of the prelude")[1]


def test_rejects_headers_it_cannot_emulate(tmp_path):
    cu = tmp_path / "bad_cuda.cu"
    cu.write_text('#include <cub/cub.cuh>\n#include "kx_cuda.cuh"\n'
                  'TORCH_LIBRARY_IMPL(kxops, CUDA, m) { m.impl("rope", &f); }\n')
    with pytest.raises(cuda_emulate.EmulationError, match=r"bad_cuda\.cu:1: #include <cub/cub\.cuh>"):
        cuda_emulate.host_source(str(cu))


def test_command_line_prints_the_host_source():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_emulate.py"), SELFTEST],
                         check=True, capture_output=True, text=True).stdout
    assert f'#line 1 "{SELFTEST}"' in out and "TORCH_LIBRARY_IMPL(kxops_selftest_emu, CPU, m)" in out
