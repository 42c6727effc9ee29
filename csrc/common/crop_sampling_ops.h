// The op bodies shared by both crop ops and both devices: checks, dtype handling and dispatch to a
// kernel family (`Kernels` is masklab::cpu or masklab::cuda, wrapped in a struct below).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>

#include <tuple>

#include "common/crop_sampling.h"

namespace masklab {

// Kernels must provide static templates forward and backward <scalar_t, kDeformable> with the
// signatures of crop_sampling_cpu.h, and kHostValueChecks: whether to run check_box_values (which
// reads the box values on the host, a sync on a GPU; the CUDA kernels assert on the device
// instead). The feature gradient must have the layout of at::empty_like(features), which is what
// the fake kernels in masklab_d2/layers/_ops.py promise (torch.compile relies on it).
template <typename Kernels, bool kDeformable>
at::Tensor sampling_forward(
    const char* op_name,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec) {
  check_sampling_inputs(op_name, features, boxes, offsets, spec.out_h, spec.out_w);
  check_sampling_parameters(op_name, features, spec, kDeformable);
  const c10::DeviceGuard device_guard(features.device());
  if (Kernels::kHostValueChecks) {
    check_box_values(op_name, boxes, offsets, features.size(0));
  }
  const auto opmath = opmath_dtype(features);
  const auto boxes_opmath = boxes.to(opmath).contiguous();
  const auto offsets_opmath = kDeformable ? offsets.to(opmath).contiguous() : at::Tensor();
  at::Tensor output;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "masklab_crop_sampling", [&] {
        output = Kernels::template forward<scalar_t, kDeformable>(
            features, boxes_opmath, offsets_opmath, spec);
      });
  return output;
}

// Returns (grad_features, grad_boxes, grad_offsets); a gradient not asked for is returned as
// zeros (grad_offsets is undefined for the plain op).
template <typename Kernels, bool kDeformable>
std::tuple<at::Tensor, at::Tensor, at::Tensor> sampling_backward(
    const char* op_name,
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec,
    bool features_grad,
    bool geometry_grad) {
  check_sampling_inputs(op_name, features, boxes, offsets, spec.out_h, spec.out_w);
  check_sampling_parameters(op_name, features, spec, kDeformable);
  check_grad_output(op_name, grad_output, features, boxes);
  const c10::DeviceGuard device_guard(features.device());
  if (Kernels::kHostValueChecks) {
    check_box_values(op_name, boxes, offsets, features.size(0));
  }
  const auto opmath = opmath_dtype(features);
  const auto grad_contiguous = grad_output.contiguous();
  const auto boxes_opmath = boxes.to(opmath).contiguous();
  const auto offsets_opmath = kDeformable ? offsets.to(opmath).contiguous() : at::Tensor();

  at::Tensor grad_features, grad_boxes, grad_offsets;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, features.scalar_type(), "masklab_crop_sampling", [&] {
        at::Tensor grad_positions;
        std::tie(grad_features, grad_positions) = Kernels::template backward<scalar_t, kDeformable>(
            grad_contiguous, features, boxes_opmath, offsets_opmath, spec, features_grad,
            geometry_grad);
        if (geometry_grad) {
          std::tie(grad_boxes, grad_offsets) = position_gradients_to_box_and_offsets(
              grad_positions, boxes_opmath, offsets_opmath, spec);
        }
      });
  if (!grad_features.defined()) {
    // The layout of empty_like(features), as every kernel and the fake kernel return.
    grad_features = at::zeros_like(features);
  }
  if (!grad_boxes.defined()) {
    grad_boxes = at::zeros_like(boxes, at::MemoryFormat::Contiguous);
    if (kDeformable) {
      grad_offsets = at::zeros_like(offsets, at::MemoryFormat::Contiguous);
    }
  }
  grad_boxes = grad_boxes.to(boxes.scalar_type());
  if (kDeformable) {
    grad_offsets = grad_offsets.to(offsets.scalar_type());
  }
  return {grad_features, grad_boxes, grad_offsets};
}

}  // namespace masklab
