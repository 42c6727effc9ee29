// CUDA kernels shared by crop_and_resize (kDeformable = false) and deformable_crop_and_resize.
//
// fp16/bf16 features are read as-is and every sum runs in fp32 (at::opmath_type); the feature
// gradient is scattered with atomics into an fp32 buffer and cast once at the end.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>
#include <utility>

#include "common/crop_geometry.h"
#include "common/crop_sampling.h"

namespace masklab {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t num_blocks(int64_t work) {
  return std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(1) << 20);
}

// Everything a kernel needs besides its tensors, passed by value.
template <typename acc_t>
struct SamplingParams {
  const acc_t* boxes;    // [K, 5]
  const acc_t* offsets;  // [K, 2, G, G] or nullptr
  int64_t grid, batch_size, channels, height, width, out_h, out_w;
  acc_t spatial_scale, gamma;
  bool aligned;

  SamplingParams(
      const at::Tensor& boxes_opmath,
      const at::Tensor& offsets_opmath,
      at::IntArrayRef feature_sizes,
      const SamplingSpec& spec)
      : boxes(boxes_opmath.const_data_ptr<acc_t>()),
        offsets(offsets_opmath.defined() ? offsets_opmath.const_data_ptr<acc_t>() : nullptr),
        grid(offsets_opmath.defined() ? offsets_opmath.size(2) : 1),
        batch_size(feature_sizes[0]),
        channels(feature_sizes[1]),
        height(feature_sizes[2]),
        width(feature_sizes[3]),
        out_h(spec.out_h),
        out_w(spec.out_w),
        spatial_scale(static_cast<acc_t>(spec.spatial_scale)),
        gamma(static_cast<acc_t>(spec.gamma)),
        aligned(spec.aligned) {}

  // The bilinear sample (i, j) of ``box`` and the offset of its feature plane for ``channel``.
  //
  // The CPU checks box values on the host before any kernel runs; here that would cost a host
  // sync per call, so the same conditions are device-side asserts (a failure surfaces at the
  // next synchronising call as a CUDA "device-side assert triggered" error naming the message).
  template <bool kDeformable>
  __device__ __forceinline__ BilinearSample<acc_t> sample(
      int64_t box, int64_t channel, int64_t i, int64_t j, int64_t& plane_offset) const {
    const acc_t* box_row = boxes + box * 5;
    const acc_t batch_value = box_row[0];
    CUDA_KERNEL_ASSERT_MSG(
        batch_value >= 0 && batch_value < static_cast<acc_t>(batch_size) &&
            batch_value == floor(batch_value),
        "masklab crop ops: box batch indices (column 0) must be integers in [0, N)");
    // The inputs are checked, not the positions: finite boxes and offsets can still give a
    // position that overflows (a box near the float range); that sample reads 0, as on the CPU.
    CUDA_KERNEL_ASSERT_MSG(
        isfinite(box_row[1]) && isfinite(box_row[2]) && isfinite(box_row[3]) &&
            isfinite(box_row[4]),
        "masklab crop ops: boxes contain NaN or infinite coordinates");
    const acc_t* box_offsets = kDeformable ? offsets + box * 2 * grid * grid : nullptr;
    if (kDeformable) {
      // The two offsets this sample's sub-box uses (every cell is used by some sample).
      const int64_t cell = offset_cell(i, j, out_h, out_w, grid);
      CUDA_KERNEL_ASSERT_MSG(
          isfinite(box_offsets[cell]) && isfinite(box_offsets[grid * grid + cell]),
          "masklab crop ops: offsets contain NaN or infinite values");
    }
    const BoxGeometry<acc_t> geometry(box_row, spatial_scale, aligned, box_offsets, grid, gamma);
    acc_t y, x;
    geometry.position(i, j, out_h, out_w, y, x);
    BilinearSample<acc_t> result;
    result.setup(y, x, height, width, aligned);
    plane_offset = (geometry.batch_index * channels + channel) * height * width;
    return result;
  }

  // sample() for element ``index`` of a [K, C, out_h, out_w] output (or grad_output).
  template <bool kDeformable>
  __device__ __forceinline__ BilinearSample<acc_t> sample_element(
      int64_t index, int64_t& plane_offset) const {
    const int64_t j = index % out_w;
    const int64_t i = (index / out_w) % out_h;
    const int64_t rows = index / (out_w * out_h);
    return sample<kDeformable>(rows / channels, rows % channels, i, j, plane_offset);
  }
};

// One thread per output element (box, channel, i, j).
template <typename scalar_t, typename acc_t, bool kDeformable>
__global__ void forward_kernel(
    int64_t total,
    const scalar_t* __restrict__ features,
    SamplingParams<acc_t> params,
    scalar_t* __restrict__ output) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    int64_t plane_offset;
    const auto sample = params.template sample_element<kDeformable>(index, plane_offset);
    const scalar_t* plane = features + plane_offset;
    acc_t value = 0;
    // Only present corners are read: an outside sample or an absent corner must not touch the
    // map (a non-finite value there would turn 0 * x into NaN, and an H * W = 0 map has no
    // element to read), as on the CPU.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (sample.present[q]) {
        value += sample.weight[q] * static_cast<acc_t>(plane[sample.index[q]]);
      }
    }
    output[index] = static_cast<scalar_t>(value);
  }
}

// One thread per grad_output element, scattering into the feature gradient.
template <typename scalar_t, typename acc_t, bool kDeformable>
__global__ void backward_features_kernel(
    int64_t total,
    const scalar_t* __restrict__ grad_output,
    SamplingParams<acc_t> params,
    acc_t* __restrict__ grad_features) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    int64_t plane_offset;
    const auto sample = params.template sample_element<kDeformable>(index, plane_offset);
    if (!sample.inside) {
      continue;
    }
    const acc_t g_value = static_cast<acc_t>(grad_output[index]);
    acc_t* plane = grad_features + plane_offset;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (sample.present[q]) {
        gpuAtomicAdd(plane + sample.index[q], sample.weight[q] * g_value);
      }
    }
  }
}

// One thread per sample (box, i, j), looping over channels: consecutive threads read
// consecutive grad_output elements of the same channel.
template <typename scalar_t, typename acc_t, bool kDeformable>
__global__ void backward_positions_kernel(
    int64_t total,
    const scalar_t* __restrict__ grad_output,
    const scalar_t* __restrict__ features,
    SamplingParams<acc_t> params,
    acc_t* __restrict__ grad_positions) {
  const int64_t num_samples = params.out_h * params.out_w;
  const int64_t plane_size = params.height * params.width;
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t s = index % num_samples;
    const int64_t box = index / num_samples;
    int64_t plane_offset;
    const auto sample = params.template sample<kDeformable>(
        box, 0, s / params.out_w, s % params.out_w, plane_offset);
    // The channel sums and the final formula are the CPU's (crop_geometry.h): along a clamped
    // axis the gradient is exactly 0 even for an inf or NaN upstream gradient (g * 0 would be
    // NaN), as on the CPU.
    acc_t sums[4] = {0, 0, 0, 0};
    if (sample.inside) {
      for (int64_t c = 0; c < params.channels; ++c) {
        acc_t values[4];
        sample.corners(features + plane_offset + c * plane_size, values);
        BilinearSample<acc_t>::accumulate_position_sums(
            static_cast<acc_t>(grad_output[(box * params.channels + c) * num_samples + s]),
            values,
            sums);
      }
    }
    sample.position_gradient(sums, grad_positions[2 * index], grad_positions[2 * index + 1]);
  }
}

template <typename scalar_t, bool kDeformable>
at::Tensor forward(
    const at::Tensor& features_any_layout,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto features = features_any_layout.contiguous();
  auto output =
      at::empty({boxes.size(0), features.size(1), spec.out_h, spec.out_w}, features.options());
  const int64_t total = output.numel();
  if (total > 0) {
    forward_kernel<scalar_t, acc_t, kDeformable>
        <<<num_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            total,
            features.const_data_ptr<scalar_t>(),
            SamplingParams<acc_t>(boxes, offsets, features.sizes(), spec),
            output.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return output;
}

// Same contract as cpu::backward.
template <typename scalar_t, bool kDeformable>
std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output,
    const at::Tensor& features_any_layout,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec,
    bool features_grad,
    bool positions_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const SamplingParams<acc_t> params(boxes, offsets, features_any_layout.sizes(), spec);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor grad_features, grad_positions;
  if (features_grad) {
    // The scatter adds with atomics in an unspecified order (roi_align's CUDA backward warns
    // alike); the position gradients below are sums in a fixed order.
    at::globalContext().alertNotDeterministic("masklab crop ops: CUDA backward (feature gradient)");
    auto grad_acc = at::zeros(
        features_any_layout.sizes(),
        grad_output.options().dtype(at::toOpMathType(grad_output.scalar_type())));
    const int64_t total = grad_output.numel();
    if (total > 0) {
      backward_features_kernel<scalar_t, acc_t, kDeformable>
          <<<num_blocks(total), kThreads, 0, stream>>>(
              total,
              grad_output.const_data_ptr<scalar_t>(),
              params,
              grad_acc.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // The layout of empty_like(features), as the fake kernel says.
    grad_features =
        at::empty_like(features_any_layout, grad_acc.options().dtype(grad_output.scalar_type()));
    if (grad_features.is_contiguous() && grad_features.scalar_type() == grad_acc.scalar_type()) {
      grad_features = grad_acc;
    } else {
      grad_features.copy_(grad_acc);
    }
  }
  if (positions_grad) {
    const auto features = features_any_layout.contiguous();
    grad_positions = at::empty({boxes.size(0), spec.out_h, spec.out_w, 2}, boxes.options());
    const int64_t total = boxes.size(0) * spec.out_h * spec.out_w;
    if (total > 0) {
      backward_positions_kernel<scalar_t, acc_t, kDeformable>
          <<<num_blocks(total), kThreads, 0, stream>>>(
              total,
              grad_output.const_data_ptr<scalar_t>(),
              features.const_data_ptr<scalar_t>(),
              params,
              grad_positions.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {grad_features, grad_positions};
}

}  // namespace cuda

// The kernel family, as a type for crop_sampling_ops.h.
struct CudaKernels {
  // No host-side box checks (a sync per call): SamplingParams::sample asserts on the device.
  static constexpr bool kHostValueChecks = false;
  template <typename scalar_t, bool kDeformable, typename... Args>
  static at::Tensor forward(Args&&... args) {
    return cuda::forward<scalar_t, kDeformable>(std::forward<Args>(args)...);
  }
  template <typename scalar_t, bool kDeformable, typename... Args>
  static std::tuple<at::Tensor, at::Tensor> backward(Args&&... args) {
    return cuda::backward<scalar_t, kDeformable>(std::forward<Args>(args)...);
  }
};

}  // namespace masklab
