"""Shared test helpers: devices and backends to test, and the tolerance rule."""
import torch


HAS_CUDA = torch.cuda.is_available()
INTERPRETING = not HAS_CUDA  # conftest switches Triton's interpreter on without a GPU

# (backend, device) pairs that run on this machine. Triton runs in the interpreter on CPU tensors
# when there is no GPU (tiny shapes only), on the GPU otherwise.
BACKENDS = [("cpu", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")]
if HAS_CUDA:
    BACKENDS.insert(1, ("cuda", "cuda"))
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKENDS]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

# Absolute floor of the tolerance rule, about one unit in the last place at magnitude 1.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_ref(out, ref64, ref_lp, what="output"):
    """max|out - ref64| <= 2 * max|ref_lp - ref64| + floor: the reference's own error in out's dtype
    sets the bar (strict in fp32, fair in bf16)."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert out.dtype == ref_lp.dtype, (out.dtype, ref_lp.dtype)
    out64 = out.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    ref64 = ref64.detach().double().cpu()
    err = (out64 - ref64).abs().max().item() if out.numel() else 0.0
    ref_err = (ref_lp.detach().double().cpu() - ref64).abs().max().item() if out.numel() else 0.0
    bound = 2 * ref_err + FLOOR[out.dtype]
    assert err <= bound, f"{what}: max|out - ref64| = {err:.3g} > 2 * {ref_err:.3g} + {FLOOR[out.dtype]:g}"
