// deformable_crop_and_resize: MaskLab's deformable crop-and-resize. The output lattice is split
// into G x G groups ("sub-boxes"); group (gi, gj) is shifted by gamma * offsets[k, :, gi, gj] *
// (box_w, box_h) before sampling. Gradients to features, boxes and offsets. Sampling rules:
// common/crop_geometry.h.
//
// Schema (masklab.cpp):
//   deformable_crop_and_resize(Tensor features, Tensor boxes, Tensor offsets, float spatial_scale,
//                              SymInt output_height, SymInt output_width, float gamma,
//                              bool aligned) -> Tensor
//   _deformable_crop_and_resize_backward(Tensor grad, Tensor features, Tensor boxes,
//                                        Tensor offsets, float spatial_scale, float gamma,
//                                        bool aligned, bool[3] output_mask)
//       -> (Tensor, Tensor, Tensor)
//
// The op bodies below take the kernel family (CpuKernels, CudaKernels) as a template argument;
// deformable_crop_and_resize_cpu.cpp and _cuda.cu register them for their dispatch keys.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "common/crop_sampling_ops.h"

namespace masklab {

template <typename Kernels>
at::Tensor deformable_crop_and_resize(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    int64_t output_height,
    int64_t output_width,
    double gamma,
    bool aligned) {
  return sampling_forward<Kernels, true>(
      "deformable_crop_and_resize",
      features,
      boxes,
      offsets,
      SamplingSpec{spatial_scale, output_height, output_width, gamma, aligned});
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor> deformable_crop_and_resize_backward(
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
  return sampling_backward<Kernels, true>(
      "deformable_crop_and_resize backward",
      grad,
      features,
      boxes,
      offsets,
      SamplingSpec{spatial_scale, grad.size(2), grad.size(3), gamma, aligned},
      output_mask[0],
      output_mask[1] || output_mask[2]);
}

}  // namespace masklab
