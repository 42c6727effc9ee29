// Operator schemas of the masklab library (torch.ops.masklab.*) and the Python module that loads
// them. Device kernels register themselves in each op folder's _cpu.cpp / _cuda.cu; fake (meta)
// kernels and autograd formulas are registered from Python in masklab_d2/layers/_ops.py, which
// importing this module imports (see the end of PYBIND11_MODULE), so that a process that loads
// only the extension (`import masklab_d2._C`, e.g. before torch.export.load) has them too.
#include <torch/extension.h>
#include <torch/library.h>

#include "common/crop_sampling_cpu.h"

// The Python module that registers the fake kernels and autograd formulas.
constexpr const char* kRegistrationModule = "masklab_d2.layers._ops";

TORCH_LIBRARY(masklab, m) {
  // Names that module to torch for every op defined below: torch.library.register_fake checks that
  // the fake kernels are registered from it, and a missing fake kernel (the library loaded by
  // torch.ops.load_library, without Python) is reported with "import masklab_d2.layers._ops".
  m.set_python_module(kRegistrationModule, "masklab_d2's fake kernels and autograd formulas");
  m.def(
      "crop_and_resize(Tensor features, Tensor boxes, float spatial_scale, SymInt crop_height, "
      "SymInt crop_width, bool aligned=False) -> Tensor");
  m.def(
      "_crop_and_resize_backward(Tensor grad, Tensor features, Tensor boxes, "
      "float spatial_scale, bool aligned, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "deformable_crop_and_resize(Tensor features, Tensor boxes, Tensor offsets, "
      "float spatial_scale, SymInt output_height, SymInt output_width, float gamma=0.1, "
      "bool aligned=False) -> Tensor");
  m.def(
      "_deformable_crop_and_resize_backward(Tensor grad, Tensor features, Tensor boxes, "
      "Tensor offsets, float spatial_scale, float gamma, bool aligned, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace {

bool compiled_with_cuda() {
#if defined(WITH_CUDA)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "masklab_d2 compiled ops; use them through masklab_d2.layers or torch.ops.masklab";
  m.def("compiled_with_cuda", &compiled_with_cuda, "Whether the CUDA kernels were built.");
  m.def(
      "_cpu_layout",
      [](const at::Tensor& features, int64_t num_boxes, int64_t num_samples) {
        return std::string(masklab::cpu::layout_name(
            masklab::cpu::choose_layout(features, num_boxes, num_samples)));
      },
      "How the CPU kernels read these features for num_boxes crops of num_samples samples "
      "(channels_last, nchw or copy_to_channels_last); for tests and benchmarks.");

  // Register the fake kernels and autograd formulas now. That module imports this one
  // (`from masklab_d2 import _C`), which Python only adds to sys.modules once this function has
  // returned: entered here first, the import would load the extension again and recurse. So this
  // module goes into sys.modules first (Python's import puts the same object there afterwards),
  // and out again if the registration fails, so that a later import retries it.
  auto modules = py::module_::import("sys").attr("modules");
  const py::object name = m.attr("__name__");  // "masklab_d2._C"
  modules[name] = m;
  try {
    py::module_::import(kRegistrationModule);
  } catch (...) {
    if (modules.contains(name)) {
      modules.attr("pop")(name);
    }
    throw;
  }
}
