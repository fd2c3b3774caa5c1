// pybind11 bindings of the CPU step kernels. Inputs arrive as numpy views of torch tensors
// (tensor.detach().numpy(), zero-copy; bfloat16 as an int16 view). Nothing is ever converted or
// copied here: an array of the wrong dtype, layout or size raises ValueError naming the argument.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include <pybind11/stl.h>

#include "step_kernels.h"

namespace py = pybind11;
using namespace diffrl_fast;

#define CHECK_ARG(cond, ...)                                   \
  do {                                                         \
    if (!(cond)) throw py::value_error(std::string(__VA_ARGS__)); \
  } while (0)

namespace {

const char* kNames[6] = {"x", "y", "eu", "ec", "ref_eu", "ref_ec"};

int64_t itemsize_of(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }
int64_t acc_itemsize(int dtype) { return dtype == kFloat64 ? 8 : 4; }

void check_dtype(const py::array& a, const std::string& name, int dtype) {
  const char kind = a.dtype().kind();
  CHECK_ARG(a.itemsize() == itemsize_of(dtype), name + ": itemsize " + std::to_string(a.itemsize()) +
                                                    " does not match dtype code " + std::to_string(dtype));
  if (dtype == kBFloat16) {
    CHECK_ARG(kind == 'i' || kind == 'u', name + ": bfloat16 must be passed as an int16 view");
  } else {
    CHECK_ARG(kind == 'f', name + ": expected a floating array");
  }
}

// An input latent array: right dtype, last dim contiguous.
Rows rows_of(const py::handle& obj, const std::string& name, int dtype, int64_t so, int64_t si) {
  Rows r;
  if (obj.is_none()) return r;
  CHECK_ARG(py::isinstance<py::array>(obj), name + ": expected a numpy array or None");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  check_dtype(a, name, dtype);
  CHECK_ARG(a.ndim() >= 1, name + ": expected at least one dim");
  CHECK_ARG(a.shape(a.ndim() - 1) <= 1 || a.strides(a.ndim() - 1) == a.itemsize(),
            name + ": last dim is not contiguous; pass .contiguous()");
  r.ptr = a.data();
  r.so = so;
  r.si = si;
  return r;
}

// An output (or per-row input) array: right dtype, C-contiguous, exactly n elements.
template <bool Writeable>
void* flat_of(const py::handle& obj, const std::string& name, int64_t itemsize, char kind, int64_t n) {
  if (obj.is_none()) return nullptr;
  CHECK_ARG(py::isinstance<py::array>(obj), name + ": expected a numpy array or None");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  CHECK_ARG(a.itemsize() == itemsize && (kind == '*' || a.dtype().kind() == kind || (kind == 'i' && a.dtype().kind() == 'u')),
            name + ": wrong dtype");
  CHECK_ARG(a.flags() & py::array::c_style, name + ": must be C-contiguous");
  CHECK_ARG(a.size() == n, name + ": has " + std::to_string(a.size()) + " elements, expected " + std::to_string(n));
  if (Writeable) {
    CHECK_ARG(a.writeable(), name + ": must be writeable");
    return a.mutable_data();
  }
  return const_cast<void*>(a.data());
}

StepArgs make_args(int dtype, int64_t n_rows, int64_t n_inner, int64_t D, const py::list& tensors, const py::list& strides,
                   const py::handle& coef, bool clip, int n_threads) {
  CHECK_ARG(dtype >= kFloat32 && dtype <= kBFloat16, "dtype code must be 0..3");
  CHECK_ARG(n_rows >= 0 && n_inner >= 1 && D >= 1, "bad sizes");
  CHECK_ARG(tensors.size() == 6 && strides.size() == 6, "expected 6 tensors (x, y, eu, ec, ref_eu, ref_ec) and 6 stride pairs");
  StepArgs args;
  args.dtype = dtype;
  args.n_rows = n_rows;
  args.n_inner = n_inner;
  args.D = D;
  args.clip = clip;
  args.n_threads = n_threads < 1 ? 1 : n_threads;
  Rows* slots[6] = {&args.x, &args.y, &args.eu, &args.ec, &args.ref_eu, &args.ref_ec};
  for (int i = 0; i < 6; ++i) {
    py::tuple st = py::reinterpret_borrow<py::tuple>(strides[i]);
    *slots[i] = rows_of(tensors[i], kNames[i], dtype, st[0].cast<int64_t>(), st[1].cast<int64_t>());
  }
  CHECK_ARG(args.x.ptr != nullptr, "x is required");
  CHECK_ARG(!args.ec.ptr || args.eu.ptr, "ec needs eu");
  CHECK_ARG(!args.ref_eu.ptr || args.eu.ptr, "ref_eu needs eu");
  CHECK_ARG(!args.ref_eu.ptr || (args.ref_ec.ptr != nullptr) == (args.ec.ptr != nullptr), "ref_ec must mirror ec");
  CHECK_ARG(!clip || args.eu.ptr, "clip needs eu");
  args.coef = flat_of<false>(coef, "coef", acc_itemsize(dtype), 'f', n_rows * kCoef);
  return args;
}

void py_step_fwd(int dtype, int64_t n_rows, int64_t n_inner, int64_t D, const py::list& tensors, const py::list& strides,
                 const py::object& coef, bool clip, const py::object& ss, const py::object& kk, const py::object& mean,
                 int n_threads) {
  StepArgs args = make_args(dtype, n_rows, n_inner, D, tensors, strides, coef, clip, n_threads);
  FwdOut out;
  out.ss = flat_of<true>(ss, "ss", acc_itemsize(dtype), 'f', n_rows);
  out.kk = flat_of<true>(kk, "kk", acc_itemsize(dtype), 'f', n_rows);
  out.mean = flat_of<true>(mean, "mean", itemsize_of(dtype), dtype == kBFloat16 ? 'i' : 'f', n_rows * D);
  CHECK_ARG(!out.ss || args.y.ptr, "ss needs y");
  CHECK_ARG(!out.kk || args.ref_eu.ptr, "kk needs ref_eu");
  py::gil_scoped_release release;
  step_fwd(args, out);
}

void py_step_bwd(int dtype, int64_t n_rows, int64_t n_inner, int64_t D, const py::list& tensors, const py::list& strides,
                 const py::object& coef, bool clip, const py::object& w_ss, const py::object& w_kk, const py::object& g_mean,
                 const py::object& dx, const py::object& dy, const py::object& deu, const py::object& dec, int n_threads) {
  StepArgs args = make_args(dtype, n_rows, n_inner, D, tensors, strides, coef, clip, n_threads);
  const char lat_kind = dtype == kBFloat16 ? 'i' : 'f';
  BwdIn in;
  in.w_ss = flat_of<false>(w_ss, "w_ss", acc_itemsize(dtype), 'f', n_rows);
  in.w_kk = flat_of<false>(w_kk, "w_kk", acc_itemsize(dtype), 'f', n_rows);
  in.g_mean = flat_of<false>(g_mean, "g_mean", itemsize_of(dtype), lat_kind, n_rows * D);
  BwdOut out;
  out.dx = flat_of<true>(dx, "dx", itemsize_of(dtype), lat_kind, n_rows * D);
  out.dy = flat_of<true>(dy, "dy", itemsize_of(dtype), lat_kind, n_rows * D);
  out.deu = flat_of<true>(deu, "deu", itemsize_of(dtype), lat_kind, n_rows * D);
  out.dec = flat_of<true>(dec, "dec", itemsize_of(dtype), lat_kind, n_rows * D);
  CHECK_ARG(!in.w_ss || args.y.ptr, "w_ss needs y");
  CHECK_ARG(!in.w_kk || args.ref_eu.ptr, "w_kk needs ref_eu");
  CHECK_ARG(!out.dy || args.y.ptr, "dy needs y");
  CHECK_ARG(!out.deu || args.eu.ptr, "deu needs eu");
  CHECK_ARG(!out.dec || args.ec.ptr, "dec needs ec");
  py::gil_scoped_release release;
  step_bwd(args, in, out);
}

// The fused PPO loss takes raw data pointers: it is called once per loss from ops/ppo.py, which has
// already validated every dtype, shape, device and stride, and numpy views would cost more than the
// kernel at small shapes. ints and reals are documented in ppo_step_raw's docstring below.
int64_t py_ppo_step_raw(const std::vector<int64_t>& v, const std::vector<double>& f) {
  CHECK_ARG(v.size() == 42 && f.size() == 10, "ppo_step_raw: expected 42 ints and 10 reals");
  StepArgs args;
  args.dtype = static_cast<int>(v[0]);
  args.n_rows = v[1];
  args.n_inner = v[2];
  args.D = v[3];
  args.clip = v[4] != 0;
  args.n_threads = v[7] < 1 ? 1 : static_cast<int>(v[7]);
  CHECK_ARG(args.dtype >= kFloat32 && args.dtype <= kBFloat16 && args.n_rows >= 0 && args.n_inner >= 1 && args.D >= 1,
            "ppo_step_raw: bad sizes or dtype");
  Rows* slots[4] = {&args.x, &args.y, &args.eu, &args.ec};
  for (int i = 0; i < 4; ++i) {
    slots[i]->ptr = reinterpret_cast<const void*>(static_cast<uintptr_t>(v[8 + 3 * i]));
    slots[i]->so = v[9 + 3 * i];
    slots[i]->si = v[10 + 3 * i];
  }
  args.coef = reinterpret_cast<const void*>(static_cast<uintptr_t>(v[20]));
  CHECK_ARG(args.x.ptr && args.y.ptr, "ppo_step_raw: x and y are required");
  CHECK_ARG(!args.ec.ptr || args.eu.ptr, "ppo_step_raw: ec needs eu");
  CHECK_ARG(!args.clip || (args.coef && args.eu.ptr), "ppo_step_raw: clip needs the coefficient matrix and eu");
  PPOArgs pa;
  RowVal* rv[7] = {&pa.a, &pa.b, &pa.g, &pa.s, &pa.log_s, &pa.old_logp, &pa.adv};
  for (int i = 0; i < 7; ++i) {
    rv[i]->ptr = reinterpret_cast<const void*>(static_cast<uintptr_t>(v[21 + 2 * i]));
    rv[i]->stride = v[22 + 2 * i];
    rv[i]->value = f[3 + i];
  }
  pa.clip_mode = static_cast<int>(v[5]);
  pa.reduction = static_cast<int>(v[6]);
  pa.clip_range = f[0];
  pa.adv_clip = f[1];
  pa.scale = f[2];
  CHECK_ARG(pa.clip_mode == 0 || pa.clip_mode == 1, "ppo_step_raw: clip_mode must be 0 or 1");
  CHECK_ARG(pa.reduction == 0 || pa.reduction == 1, "ppo_step_raw: reduction must be 0 or 1");
  PPOOut out;
  void** outs[7] = {&out.logp, &out.dlogp, &out.stats, &out.dx, &out.dy, &out.deu, &out.dec};
  for (int i = 0; i < 7; ++i) *outs[i] = reinterpret_cast<void*>(static_cast<uintptr_t>(v[35 + i]));
  CHECK_ARG(out.logp && out.dlogp && out.stats, "ppo_step_raw: logp, dlogp and stats are required");
  CHECK_ARG((!out.deu || args.eu.ptr) && (!out.dec || args.ec.ptr), "ppo_step_raw: a gradient without its input");
  {
    py::gil_scoped_release release;
    ppo_step(args, pa, out);
  }
  // the bad-row count (stats[4]) as a Python int, so the caller's check reads no tensor
  const double bad = args.dtype == kFloat64 ? static_cast<const double*>(out.stats)[4]
                                            : static_cast<double>(static_cast<const float*>(out.stats)[4]);
  return static_cast<int64_t>(bad);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffrl_fast CPU kernels: fused affine diffusion step (sums of squares forward, gradients backward)";
  m.attr("CHUNK") = py::int_(kChunk);
  m.def("step_fwd", &py_step_fwd, py::arg("dtype"), py::arg("n_rows"), py::arg("n_inner"), py::arg("D"),
        py::arg("tensors"), py::arg("strides"), py::arg("coef"), py::arg("clip"), py::arg("ss"), py::arg("kk"),
        py::arg("mean"), py::arg("n_threads"));
  m.def("step_bwd", &py_step_bwd, py::arg("dtype"), py::arg("n_rows"), py::arg("n_inner"), py::arg("D"),
        py::arg("tensors"), py::arg("strides"), py::arg("coef"), py::arg("clip"), py::arg("w_ss"), py::arg("w_kk"),
        py::arg("g_mean"), py::arg("dx"), py::arg("dy"), py::arg("deu"), py::arg("dec"), py::arg("n_threads"));
  m.def("ppo_step_raw", &py_ppo_step_raw, py::arg("ints"), py::arg("reals"),
        "Fused PPO step loss on raw pointers (internal; see diffrl_fast/ops/backends/cpp_backend.py).\n"
        "ints: dtype, n_rows, n_inner, D, clip, clip_mode, reduction, n_threads, then (ptr, so, si) of x, y, eu, ec,\n"
        "coef ptr (0: none), (ptr, stride) of a, b, g, s, log_s, old_logp, adv, then the ptrs of logp, dlogp,\n"
        "stats, dx, dy, deu, dec (0: not needed). reals: clip_range (<0: none), adv_clip (<0: none), scale,\n"
        "then the values of a, b, g, s, log_s, old_logp, adv used where their ptr is 0.\n"
        "Returns the number of rows with s <= 0 or a non-finite value (also stats[4]).");
}
