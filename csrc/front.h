// The front layer every op family shares (host only, never compiled by nvcc).
//
// A family's public function (pyext/<family>.py) is one call into its front (csrc/<family>.cpp): in
// eager mode through a CPython entry (pyentry.h), under torch.compile through the family's
// CompositeImplicitAutograd front op, which runs the same C++ code on fake tensors. The front checks the
// user's arguments with the helpers below (errors name the op and the argument, with the Python
// exception type a user expects), normalises them to the family's kernel contract, picks a backend and
// calls that backend's op through the dispatcher. Nothing here is traced by Dynamo, so the backend
// choice can never break a graph, and nothing is allocated for arguments that are already right.
#pragma once
#include <ATen/ATen.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include "front_hooks.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace kxops::front {

// ---- how values print in messages: as Python prints them ---------------------------------------

inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string shape_str(at::IntArrayRef s) {  // Python's tuple(t.shape): (5,) or (2, 3)
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

// ---- argument checks (TypeError / ValueError naming the argument) ------------------------------

inline bool is_int_dtype(at::ScalarType t) {
  return at::isIntegralType(t, /*includeBool=*/false);
}

inline void check_float(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", arg,
                   " must be a floating-point tensor (float16, bfloat16, float32, float64), got ",
                   dtype_name(t.scalar_type()));
}

inline void check_int(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_int_dtype(t.scalar_type()), op, ": ", arg, " must be an integer tensor, got ",
                   dtype_name(t.scalar_type()));
}

// `t` must be on `ref`'s device; `ref_name` is how the message calls ref ("x").
inline void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                         const char* ref_name = "x") {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " must be on ", ref_name, "'s device ",
                    ref.device(), ", got ", t.device());
}

// Tensors that are traced rather than computed on: fake (torch.compile, export), functional
// (AOTAutograd), functorch wrappers, meta, or any tensor seen while a dispatch mode is active. Their
// data is never read (no value checks, no host syncs) and they never enter a cache.
inline bool traced(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper});
  return t.key_set().has_any(wrapped) || !(t.is_cpu() || t.is_cuda()) ||
         c10::impl::TorchDispatchModeTLS::stack_len() > 0;
}

// cuda_capturing (front_hooks.h): set by the CUDA build, null in a CPU-only build.

inline bool capturing(const at::Tensor& t) {
  return t.is_cuda() && cuda_capturing != nullptr && cuda_capturing();
}

// cu_seqlens of a packed batch: int32 (batch + 1,) on x's device, starting at 0, non-decreasing, ending
// at `total`. The value checks read the data (one host sync for all three); they are skipped for
// traced tensors and during CUDA graph capture. Returns the contiguous tensor.
inline at::Tensor check_cu_seqlens(const char* op, const at::Tensor& cu, int64_t total, const at::Tensor& x) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", dtype_name(cu.scalar_type()));
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 2, op, ": cu_seqlens must be a 1-D (batch + 1,) tensor, got shape ",
                    shape_str(cu.sizes()));
  check_device(op, "cu_seqlens", cu, x);
  at::Tensor c = cu.contiguous();
  if (traced(c) || capturing(c)) return c;
  const at::Tensor h = c.is_cpu() ? c : c.cpu();  // the one host sync
  const int32_t* v = h.const_data_ptr<int32_t>();
  const int64_t n = h.numel();
  bool ok = v[0] == 0;
  for (int64_t i = 1; i < n && ok; ++i) ok = v[i] >= v[i - 1];
  if (!ok) {
    std::ostringstream o;
    o << "[";
    for (int64_t i = 0; i < n; ++i) o << (i ? ", " : "") << v[i];
    TORCH_CHECK_VALUE(false, op, ": cu_seqlens must start at 0 and be non-decreasing, got ", o.str(), "]");
  }
  TORCH_CHECK_VALUE(v[n - 1] == total, op, ": cu_seqlens must end at total_tokens=", total, ", got ", v[n - 1]);
  return c;
}

// ---- rows: `dim` moved last, the other dimensions flattened (the softmax families' kernel contracts) ---

// x with `dim` moved last, as contiguous (R, N) rows; `shape` is the moved tensor's shape (to undo it).
struct Rows {
  at::Tensor x;
  std::vector<int64_t> shape;
  int64_t dim = 0, R = 0, N = 0;
  bool scalar = false;
};

// `arg` names x in the dtype error (a floating tensor is required).
inline Rows to_rows(const char* op, const at::Tensor& x, int64_t dim, const char* arg = "x") {
  check_float(op, arg, x);
  Rows r;
  r.scalar = x.dim() == 0;
  const at::Tensor x1 = r.scalar ? x.reshape({1}) : x;
  r.dim = at::maybe_wrap_dim(dim, x1.dim());
  const at::Tensor moved = x1.movedim(r.dim, -1);
  r.shape = moved.sizes().vec();
  r.N = moved.size(-1);
  r.R = r.N == 0 ? 0 : moved.numel() / r.N;
  r.x = moved.reshape({r.R, r.N}).contiguous();
  return r;
}

// (R, N) rows back to the user's layout.
inline at::Tensor from_rows(const Rows& r, const at::Tensor& p) {
  const at::Tensor out = p.reshape(r.shape).movedim(-1, r.dim);
  return r.scalar ? out.reshape({}) : out;
}

// ---- backends ------------------------------------------------------------------------------------

enum class Backend { Cpu, Cuda, Triton, Reference };

inline const char* backend_name(Backend b) {
  switch (b) {
    case Backend::Cpu: return "cpu";
    case Backend::Cuda: return "cuda";
    case Backend::Triton: return "triton";
    default: return "reference";
  }
}

inline bool op_exists(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
}

// The ops of one family's backends, by name: the C++ op (CPU and CUDA kernels) and the Triton one
// (a triton_op, registered by the Python package when Triton is installed).
struct FamilyOps {
  const char* kernel;  // e.g. "kxops::rope"
  const char* triton;  // e.g. "kxops::rope_triton"
};

// Whether the build carries the family's CUDA kernels: a CPU-only build leaves the .cu files out.
inline bool has_cuda_kernels(const FamilyOps& ops) {
  const auto h = c10::Dispatcher::singleton().findSchema({ops.kernel, ""});
  return h && h->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
}

inline bool triton_interpreting() {
  const char* v = std::getenv("TRITON_INTERPRET");
  return v && std::strcmp(v, "1") == 0;
}

inline std::string available(const FamilyOps& ops) {  // as kxops.backends() lists them
  std::string s = "['reference', 'cpu'";
  const bool gpu = at::globalContext().hasCUDA();
  if (gpu && has_cuda_kernels(ops)) s += ", 'cuda'";
  if (op_exists(ops.triton) && (gpu || triton_interpreting())) s += ", 'triton'";
  return s + "]";
}

// backend="auto" picks the C++ kernel for CPU tensors and for CUDA tensors when the build has the CUDA
// kernels (else Triton, else the reference); float64 on a GPU runs the reference. An explicit backend
// must be able to run x.
inline Backend resolve_backend(const char* op, std::string_view backend, const at::Tensor& x, const FamilyOps& ops) {
  const bool cpu = x.device().is_cpu(), cuda = x.device().is_cuda();
  const bool f64 = x.scalar_type() == at::kDouble;
  if (backend == "auto") {
    if (cpu) return Backend::Cpu;
    if (cuda && !f64) {
      if (has_cuda_kernels(ops)) return Backend::Cuda;
      return op_exists(ops.triton) ? Backend::Triton : Backend::Reference;
    }
    return Backend::Reference;
  }
  Backend b = Backend::Reference;
  if (backend == "cpu") b = Backend::Cpu;
  else if (backend == "cuda") b = Backend::Cuda;
  else if (backend == "triton") b = Backend::Triton;
  else if (backend == "reference") b = Backend::Reference;
  else TORCH_CHECK_VALUE(false, op, ": backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got '",
                         backend, "'");
  if ((b == Backend::Cuda || b == Backend::Triton) && f64)
    TORCH_CHECK_TYPE(false, op, ": float64 is supported by the 'cpu' and 'reference' backends only");
  if (b == Backend::Cpu) TORCH_CHECK_VALUE(cpu, op, ": backend='cpu' needs CPU tensors, got ", x.device());
  if (b == Backend::Cuda) {
    TORCH_CHECK_VALUE(cuda, op, ": backend='cuda' needs CUDA tensors, got ", x.device());
    TORCH_CHECK(has_cuda_kernels(ops), op, ": kxops was built without CUDA kernels (available: ", available(ops), ")");
  }
  if (b == Backend::Triton) {
    TORCH_CHECK(op_exists(ops.triton), op, ": triton is not installed (available: ", available(ops), ")");
    TORCH_CHECK_VALUE(cuda || triton_interpreting(), op,
                      ": backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got ", x.device());
  }
  return b;
}

// A typed handle of an op registered under `name`, looked up once (ops registered from Python, the
// Triton and reference ones, exist from `import kxops` on).
template <typename Sig>
struct Op {
  const char* name;
  std::once_flag once;
  std::optional<c10::TypedOperatorHandle<Sig>> handle;

  const c10::TypedOperatorHandle<Sig>& get() {
    std::call_once(once, [&] {
      handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
    });
    return *handle;
  }
};

// ---- constants and caches ------------------------------------------------------------------------

// A small constant table (frequencies, axis ids) as a tensor on `device`. on_device (traced, or a CUDA
// graph being captured): built there from scalar fills (one aten::full per run of equal values, then
// cat), so the values stay exact, a traced graph holds no tensor constant (which torch.export's
// decompositions could not register) and a captured one no host copy.
template <typename T>
at::Tensor constant(const std::vector<T>& values, at::ScalarType dtype, at::Device device, bool on_device) {
  const auto src = c10::CppTypeToScalarType<T>::value;
  if (on_device) {
    std::vector<at::Tensor> runs;
    for (size_t i = 0; i < values.size();) {
      size_t j = i + 1;
      while (j < values.size() && values[j] == values[i]) ++j;
      runs.push_back(at::full({static_cast<int64_t>(j - i)}, values[i], at::TensorOptions(src).device(device)));
      i = j;
    }
    if (runs.empty()) return at::empty({0}, at::TensorOptions(dtype).device(device));
    return (runs.size() == 1 ? runs[0] : at::cat(runs)).to(dtype);
  }
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())}, at::dtype(src));
  if (!values.empty()) std::memcpy(t.data_ptr(), values.data(), values.size() * sizeof(T));
  return t.to(dtype).to(device);
}

// Tables keyed by what they depend on, kept per device (a host-to-device copy per call otherwise).
template <typename Key, typename Value>
class Cache {
 public:
  template <typename Make>
  Value get(const Key& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = map_.find(key);
      if (it != map_.end()) return it->second;
    }
    Value v = make();
    std::lock_guard<std::mutex> lock(mu_);
    return map_.emplace(key, std::move(v)).first->second;
  }

 private:
  std::mutex mu_;
  std::map<Key, Value> map_;
};

// After an in-place kernel called below autograd: what ADInplaceOrView would have done, so that a
// backward that saved the old values raises instead of using the new ones.
inline void bump_version(const at::Tensor& t) {
  if (!t.is_inference() && !traced(t)) t.unsafeGetTensorImpl()->bump_version();
}

}  // namespace kxops::front
