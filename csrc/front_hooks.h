// The hooks through which a device build tells the front layer (front.h) what only it can know. Kept apart
// from front.h so that the CUDA file that sets them (csrc/cuda/front_cuda.cu) compiles without ATen.
#pragma once

namespace kxops::front {

// Whether the current CUDA stream is capturing a graph: set by the CUDA build (csrc/cuda/front_cuda.cu),
// null in a CPU-only build. While capturing, nothing may sync with or copy from the host.
extern bool (*cuda_capturing)();

}  // namespace kxops::front
