// Direct CPython entries into the families' fronts, for eager calls: torch.ops' generic argument
// parsing costs more than the whole front on a small tensor (decoding). A family registers its entry
// with `static const py::Entry e("name", &fn);` and `import kxops._C` exposes it as `kxops._C.name`.
// Entries convert their arguments with the readers below (a wrong type is a TypeError naming the
// argument), release the GIL, call the front, and turn C++ errors into the Python exceptions torch's
// own bindings raise (TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError).
#pragma once
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace kxops::py {

struct Entry {
  Entry(const char* name, PyObject* (*fn)(PyObject*, PyObject* const*, Py_ssize_t), const char* doc);
};

// The module's method table, terminated by a null entry (built from every registered Entry).
PyMethodDef* methods();

inline std::string type_name(PyObject* o) { return Py_TYPE(o)->tp_name; }

inline std::string repr(PyObject* o) {
  PyObject* r = PyObject_Repr(o);
  if (!r) {
    PyErr_Clear();
    return "?";
  }
  std::string s = PyUnicode_AsUTF8(r);
  Py_DECREF(r);
  return s;
}

inline const at::Tensor& tensor(PyObject* o, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(THPVariable_Check(o), op, ": ", arg, " must be a torch.Tensor, got ", type_name(o));
  return THPVariable_Unpack(o);
}

// None or a tensor; `what` is the expectation a wrong type is told ("an integer tensor").
inline std::optional<at::Tensor> opt_tensor(PyObject* o, const char* op, const char* arg,
                                            const char* what = "a torch.Tensor") {
  if (o == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(THPVariable_Check(o), op, ": ", arg, " must be ", what, ", got ", type_name(o));
  return THPVariable_Unpack(o);
}

inline bool is_int(PyObject* o) { return PyLong_Check(o) || (PyIndex_Check(o) && !THPVariable_Check(o)); }

inline int64_t to_int(PyObject* o) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw python_error();
  return v;
}

// An int (not a bool), or None.
inline std::optional<int64_t> opt_int(PyObject* o, const char* op, const char* arg) {
  if (o == Py_None) return std::nullopt;
  TORCH_CHECK_TYPE(is_int(o) && !PyBool_Check(o), op, ": ", arg, " must be an int, got ", type_name(o));
  return to_int(o);
}

inline double real(PyObject* o, const char* op, const char* arg) {
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, op, ": ", arg, " must be a float, got ", type_name(o));
  }
  return v;
}

inline bool flag(PyObject* o) {
  const int v = PyObject_IsTrue(o);
  if (v < 0) throw python_error();
  return v != 0;
}

// A str; anything else is reported with its repr by `check` of the caller, so return nullopt.
inline std::optional<std::string_view> str(PyObject* o) {
  if (!PyUnicode_Check(o)) return std::nullopt;
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (!s) throw python_error();
  return std::string_view(s, static_cast<size_t>(n));
}

// None or a sequence of ints.
inline std::optional<std::vector<int64_t>> opt_int_list(PyObject* o, const char* op, const char* arg) {
  if (o == Py_None) return std::nullopt;
  PyObject* seq = PySequence_Fast(o, "");
  if (!seq) {
    PyErr_Clear();
    TORCH_CHECK_TYPE(false, op, ": ", arg, " must be a sequence of ints, got ", type_name(o));
  }
  std::vector<int64_t> out;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    if (!is_int(item) || PyBool_Check(item)) {
      Py_DECREF(seq);
      TORCH_CHECK_TYPE(false, op, ": ", arg, " must be a sequence of ints, got an item of type ", type_name(item));
    }
    out.push_back(to_int(item));
  }
  Py_DECREF(seq);
  return out;
}

inline void check_nargs(const char* entry, Py_ssize_t nargs, Py_ssize_t want) {
  TORCH_CHECK(nargs == want, "kxops._C.", entry, " takes ", want, " arguments, got ", nargs);
}

}  // namespace kxops::py
