// crop_and_resize: TensorFlow-style crop-and-resize of feature maps by boxes, with gradients to
// the features and to the box coordinates. Sampling rules: common/crop_geometry.h.
//
// Schema (registered in masklab.cpp, implemented per device below):
//   crop_and_resize(Tensor features, Tensor boxes, float spatial_scale, SymInt crop_height,
//                   SymInt crop_width, bool aligned) -> Tensor
//   _crop_and_resize_backward(Tensor grad, Tensor features, Tensor boxes, float spatial_scale,
//                             bool aligned, bool[2] output_mask) -> (Tensor, Tensor)
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace masklab {

at::Tensor crop_and_resize_cpu(
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    int64_t crop_height,
    int64_t crop_width,
    bool aligned);

std::tuple<at::Tensor, at::Tensor> crop_and_resize_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    bool aligned,
    std::array<bool, 2> output_mask);

#if defined(WITH_CUDA)
at::Tensor crop_and_resize_cuda(
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    int64_t crop_height,
    int64_t crop_width,
    bool aligned);

std::tuple<at::Tensor, at::Tensor> crop_and_resize_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& features,
    const at::Tensor& boxes,
    double spatial_scale,
    bool aligned,
    std::array<bool, 2> output_mask);
#endif

}  // namespace masklab
