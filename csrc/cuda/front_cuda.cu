// The CUDA build's part of the front layer (csrc/front.h; the hook is declared in csrc/front_hooks.h, so
// this file compiles without ATen): tells the fronts whether the current stream is capturing a CUDA graph,
// so that they neither sync with nor copy from the host then.
#include "../front_hooks.h"
#include "kx_cuda.cuh"

namespace kxops::front {
namespace {

bool current_stream_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status) != cudaSuccess) {
    (void)cudaGetLastError();  // no context yet: not capturing
    return false;
  }
  return status != cudaStreamCaptureStatusNone;
}

const bool registered = [] {
  cuda_capturing = &current_stream_capturing;
  return true;
}();

}  // namespace
}  // namespace kxops::front
