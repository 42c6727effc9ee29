// crop_and_resize: TensorFlow-style crop-and-resize of feature maps by boxes, with gradients to
// the features and to the box coordinates. Sampling rules: common/crop_geometry.h.
//
// Schema (masklab.cpp):
//   crop_and_resize(Tensor features, Tensor boxes, float spatial_scale, SymInt crop_height,
//                   SymInt crop_width, bool aligned) -> Tensor
//   _crop_and_resize_backward(Tensor grad, Tensor features, Tensor boxes, float spatial_scale,
//                             bool aligned, bool[2] output_mask) -> (Tensor, Tensor)
//
// The op bodies below take the kernel family (CpuKernels, CudaKernels) as a template argument;
// crop_and_resize_cpu.cpp and crop_and_resize_cuda.cu register them for their dispatch keys.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/crop_sampling_ops.h"

namespace masklab {

template <typename Kernels>
at::Tensor crop_and_resize(
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    int64_t crop_height,
    int64_t crop_width,
    bool aligned) {
  return sampling_forward<Kernels, false>(
      "crop_and_resize",
      features,
      boxes,
      at::Tensor(),
      SamplingSpec{spatial_scale, crop_height, crop_width, 0.0, aligned});
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor> crop_and_resize_backward(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    bool aligned,
    std::array<bool, 2> output_mask) {
  TORCH_CHECK(grad.dim() == 4, "crop_and_resize backward: grad must be 4-D, got ", grad.sizes());
  auto grads = sampling_backward<Kernels, false>(
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

}  // namespace masklab
