// deformable_crop_and_resize: MaskLab's deformable crop-and-resize. The output lattice is split
// into G x G groups ("sub-boxes"); group (gi, gj) is shifted by gamma * offsets[k, :, gi, gj] *
// (box_w, box_h) before sampling. Gradients to features, boxes and offsets. Sampling rules:
// common/crop_geometry.h.
//
// Schema (registered in masklab.cpp, implemented per device below):
//   deformable_crop_and_resize(Tensor features, Tensor boxes, Tensor offsets, float spatial_scale,
//                              SymInt output_height, SymInt output_width, float gamma,
//                              bool aligned) -> Tensor
//   _deformable_crop_and_resize_backward(Tensor grad, Tensor features, Tensor boxes,
//                                        Tensor offsets, float spatial_scale, float gamma,
//                                        bool aligned, bool[3] output_mask)
//       -> (Tensor, Tensor, Tensor)
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace masklab {

at::Tensor deformable_crop_and_resize_cpu(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    int64_t output_height,
    int64_t output_width,
    double gamma,
    bool aligned);

std::tuple<at::Tensor, at::Tensor, at::Tensor> deformable_crop_and_resize_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    double gamma,
    bool aligned,
    std::array<bool, 3> output_mask);

#if defined(WITH_CUDA)
at::Tensor deformable_crop_and_resize_cuda(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    int64_t output_height,
    int64_t output_width,
    double gamma,
    bool aligned);

std::tuple<at::Tensor, at::Tensor, at::Tensor> deformable_crop_and_resize_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    double spatial_scale,
    double gamma,
    bool aligned,
    std::array<bool, 3> output_mask);
#endif

}  // namespace masklab
