// Operator schemas of the masklab library (torch.ops.masklab.*) and the Python module that loads
// them. Device kernels register themselves in each op folder's _cpu.cpp / _cuda.cu; fake (meta)
// kernels and autograd formulas are registered from Python in masklab_d2/layers/_ops.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "common/crop_sampling_cpu.h"

TORCH_LIBRARY(masklab, m) {
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
}
