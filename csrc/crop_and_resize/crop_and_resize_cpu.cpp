#include "crop_and_resize/crop_and_resize.h"

#include <torch/library.h>

#include "common/crop_sampling_cpu.h"
#include "common/crop_sampling_ops.h"

namespace masklab {

at::Tensor crop_and_resize_cpu(
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    int64_t crop_height,
    int64_t crop_width,
    bool aligned) {
  return sampling_forward<CpuKernels, false>(
      "crop_and_resize",
      features,
      boxes,
      at::Tensor(),
      SamplingSpec{spatial_scale, crop_height, crop_width, 0.0, aligned});
}

std::tuple<at::Tensor, at::Tensor> crop_and_resize_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    bool aligned,
    std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad.dim() == 4, "crop_and_resize backward: grad must be 4-D, got ", grad.sizes());
  auto grads = sampling_backward<CpuKernels, false>(
      "crop_and_resize backward",
      grad,
      features,
      boxes,
      at::Tensor(),
      SamplingSpec{spatial_scale, grad.size(2), grad.size(3), 0.0, aligned},
      output_mask[0],
      output_mask[1]);
  return {std::get<0>(grads), std::get<1>(grads)};
}

TORCH_LIBRARY_IMPL(masklab, CPU, m) {
  m.impl("crop_and_resize", &crop_and_resize_cpu);
  m.impl("_crop_and_resize_backward", &crop_and_resize_backward_cpu);
}

}  // namespace masklab
