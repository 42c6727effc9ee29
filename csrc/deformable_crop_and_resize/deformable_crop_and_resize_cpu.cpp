#include "deformable_crop_and_resize/deformable_crop_and_resize.h"

#include <torch/library.h>

#include "common/crop_sampling_cpu.h"
#include "common/crop_sampling_ops.h"

namespace masklab {

at::Tensor deformable_crop_and_resize_cpu(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    int64_t output_height,
    int64_t output_width,
    double gamma,
    bool aligned) {
  return sampling_forward<CpuKernels, true>(
      "deformable_crop_and_resize",
      features,
      boxes,
      offsets,
      SamplingSpec{spatial_scale, output_height, output_width, gamma, aligned});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> deformable_crop_and_resize_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    double gamma,
    bool aligned,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(
      grad.dim() == 4, "deformable_crop_and_resize backward: grad must be 4-D, got ", grad.sizes());
  return sampling_backward<CpuKernels, true>(
      "deformable_crop_and_resize backward",
      grad,
      features,
      boxes,
      offsets,
      SamplingSpec{spatial_scale, grad.size(2), grad.size(3), gamma, aligned},
      output_mask[0],
      output_mask[1] || output_mask[2]);
}

TORCH_LIBRARY_IMPL(masklab, CPU, m) {
  m.impl("deformable_crop_and_resize", &deformable_crop_and_resize_cpu);
  m.impl("_deformable_crop_and_resize_backward", &deformable_crop_and_resize_backward_cpu);
}

}  // namespace masklab
