// Device-agnostic pieces shared by the crop ops: argument checks, and the chain rule from
// per-sample position gradients to box and offset gradients (plain ATen, so CPU and CUDA share it).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <tuple>

namespace masklab {

// Everything that describes one crop call besides its tensors.
struct SamplingSpec {
  double spatial_scale;
  int64_t out_h;
  int64_t out_w;
  double gamma;  // only used with offsets
  bool aligned;
};

// Shape, dtype and device checks (no data access). `offsets` is undefined for the plain op.
// Boxes and offsets must have the features' dtype, or float32 with half/bfloat16 features.
void check_sampling_inputs(
    const char* op_name,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    int64_t out_h,
    int64_t out_w);

// spatial_scale (and gamma, for the deformable op) must be finite in the dtype positions are
// computed in (opmath_dtype: a double that overflows float32 is inf there): a non-finite factor
// makes every position NaN or infinite. Scalars only, so it runs on every device.
void check_sampling_parameters(
    const char* op_name,
    const at::Tensor& features,
    const SamplingSpec& spec,
    bool deformable);

// grad_output of a backward op: [K, C, out_h, out_w] for K boxes and C feature channels, on the
// features' device and in their dtype (autograd passes the output's dtype; a direct call with a
// grad elsewhere would hand a foreign pointer to the kernels).
void check_grad_output(
    const char* op_name,
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& boxes);

// Data checks that need the box values: finite coordinates, integral batch indices in [0, N),
// finite offsets. Host-side, so run on the CPU only: on CUDA it would cost a host sync per call
// (and break CUDA-graph capture); the CUDA kernels assert the same conditions on the device.
void check_box_values(
    const char* op_name,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    int64_t batch_size);

// The dtype positions are computed in: fp32 for half/bf16 features, else the feature dtype.
inline at::ScalarType opmath_dtype(const at::Tensor& features) {
  return at::toOpMathType(features.scalar_type());
}

// grad_positions: [K, out_h, out_w, 2] (d loss / d y, d loss / d x) in feature coordinates.
// Returns (grad_boxes [K, 5], grad_offsets [K, 2, G, G]); grad_offsets is undefined when
// `offsets` is. Both are in the dtype of grad_positions.
std::tuple<at::Tensor, at::Tensor> position_gradients_to_box_and_offsets(
    const at::Tensor& grad_positions,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec);

}  // namespace masklab
