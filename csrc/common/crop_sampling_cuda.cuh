// CUDA kernels shared by crop_and_resize (kDeformable = false) and deformable_crop_and_resize.
//
// fp16/bf16 features are read as-is and every sum runs in fp32 (at::opmath_type); the feature
// gradient is scattered with atomics into an fp32 buffer and cast once at the end.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
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

template <typename acc_t, bool kDeformable>
__device__ __forceinline__ BoxGeometry<acc_t> box_geometry(
    const acc_t* boxes,
    const acc_t* offsets,
    int64_t box,
    int64_t grid,
    acc_t spatial_scale,
    bool aligned,
    acc_t gamma) {
  return BoxGeometry<acc_t>(
      boxes + box * 5,
      spatial_scale,
      aligned,
      kDeformable ? offsets + box * 2 * grid * grid : nullptr,
      grid,
      gamma);
}

// One thread per output element (box, channel, i, j).
template <typename scalar_t, typename acc_t, bool kDeformable>
__global__ void forward_kernel(
    int64_t total,
    const scalar_t* __restrict__ features,
    const acc_t* __restrict__ boxes,
    const acc_t* __restrict__ offsets,
    int64_t grid,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t out_h,
    int64_t out_w,
    acc_t spatial_scale,
    bool aligned,
    acc_t gamma,
    scalar_t* __restrict__ output) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t j = index % out_w;
    const int64_t i = (index / out_w) % out_h;
    const int64_t c = (index / (out_w * out_h)) % channels;
    const int64_t box = index / (out_w * out_h * channels);
    const auto geometry = box_geometry<acc_t, kDeformable>(
        boxes, offsets, box, grid, spatial_scale, aligned, gamma);
    acc_t y, x;
    geometry.position(i, j, out_h, out_w, y, x);
    BilinearSample<acc_t> sample;
    sample.setup(y, x, height, width);
    const scalar_t* plane = features + (geometry.batch_index * channels + c) * height * width;
    acc_t value = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      value += sample.weight[q] * static_cast<acc_t>(plane[sample.index[q]]);
    }
    output[index] = static_cast<scalar_t>(value);
  }
}

template <typename scalar_t, typename acc_t, bool kDeformable>
__global__ void backward_features_kernel(
    int64_t total,
    const scalar_t* __restrict__ grad_output,
    const acc_t* __restrict__ boxes,
    const acc_t* __restrict__ offsets,
    int64_t grid,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t out_h,
    int64_t out_w,
    acc_t spatial_scale,
    bool aligned,
    acc_t gamma,
    acc_t* __restrict__ grad_features) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t j = index % out_w;
    const int64_t i = (index / out_w) % out_h;
    const int64_t c = (index / (out_w * out_h)) % channels;
    const int64_t box = index / (out_w * out_h * channels);
    const auto geometry = box_geometry<acc_t, kDeformable>(
        boxes, offsets, box, grid, spatial_scale, aligned, gamma);
    acc_t y, x;
    geometry.position(i, j, out_h, out_w, y, x);
    BilinearSample<acc_t> sample;
    sample.setup(y, x, height, width);
    if (!sample.inside) {
      continue;
    }
    const acc_t g_value = static_cast<acc_t>(grad_output[index]);
    acc_t* plane = grad_features + (geometry.batch_index * channels + c) * height * width;
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
    const acc_t* __restrict__ boxes,
    const acc_t* __restrict__ offsets,
    int64_t grid,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t out_h,
    int64_t out_w,
    acc_t spatial_scale,
    bool aligned,
    acc_t gamma,
    acc_t* __restrict__ grad_positions) {
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(blockDim.x) * gridDim.x) {
    const int64_t j = index % out_w;
    const int64_t i = (index / out_w) % out_h;
    const int64_t box = index / (out_w * out_h);
    const auto geometry = box_geometry<acc_t, kDeformable>(
        boxes, offsets, box, grid, spatial_scale, aligned, gamma);
    acc_t y, x;
    geometry.position(i, j, out_h, out_w, y, x);
    BilinearSample<acc_t> sample;
    sample.setup(y, x, height, width);
    acc_t grad_y = 0, grad_x = 0;
    if (sample.inside) {
      const int64_t num_samples = out_h * out_w;
      const int64_t s = i * out_w + j;
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* plane = features + (geometry.batch_index * channels + c) * height * width;
        acc_t values[4];
        sample.corners(plane, values);
        acc_t dvalue_dy, dvalue_dx;
        sample.position_gradient(values, dvalue_dy, dvalue_dx);
        const acc_t g_value =
            static_cast<acc_t>(grad_output[(box * channels + c) * num_samples + s]);
        grad_y += g_value * dvalue_dy;
        grad_x += g_value * dvalue_dx;
      }
    }
    grad_positions[2 * index] = grad_y;
    grad_positions[2 * index + 1] = grad_x;
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
  const int64_t channels = features.size(1);
  auto output =
      at::empty({boxes.size(0), channels, spec.out_h, spec.out_w}, features.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  forward_kernel<scalar_t, acc_t, kDeformable>
      <<<num_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          total,
          features.const_data_ptr<scalar_t>(),
          boxes.const_data_ptr<acc_t>(),
          kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr,
          kDeformable ? offsets.size(2) : 1,
          channels,
          features.size(2),
          features.size(3),
          spec.out_h,
          spec.out_w,
          static_cast<acc_t>(spec.spatial_scale),
          spec.aligned,
          static_cast<acc_t>(spec.gamma),
          output.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return output;
}

template <typename scalar_t, bool kDeformable>
at::Tensor backward_features(
    const at::Tensor& grad_output,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    at::IntArrayRef feature_sizes,
    const SamplingSpec& spec) {
  using acc_t = at::opmath_type<scalar_t>;
  auto grad_acc = at::zeros(feature_sizes, grad_output.options().dtype(
      at::toOpMathType(grad_output.scalar_type())));
  const int64_t total = grad_output.numel();
  if (total > 0) {
    backward_features_kernel<scalar_t, acc_t, kDeformable>
        <<<num_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            total,
            grad_output.const_data_ptr<scalar_t>(),
            boxes.const_data_ptr<acc_t>(),
            kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr,
            kDeformable ? offsets.size(2) : 1,
            feature_sizes[1],
            feature_sizes[2],
            feature_sizes[3],
            spec.out_h,
            spec.out_w,
            static_cast<acc_t>(spec.spatial_scale),
            spec.aligned,
            static_cast<acc_t>(spec.gamma),
            grad_acc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_acc.to(grad_output.scalar_type());
}

template <typename scalar_t, bool kDeformable>
at::Tensor backward_positions(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec) {
  using acc_t = at::opmath_type<scalar_t>;
  auto grad_positions = at::empty({boxes.size(0), spec.out_h, spec.out_w, 2}, boxes.options());
  const int64_t total = boxes.size(0) * spec.out_h * spec.out_w;
  if (total > 0) {
    backward_positions_kernel<scalar_t, acc_t, kDeformable>
        <<<num_blocks(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            total,
            grad_output.const_data_ptr<scalar_t>(),
            features.const_data_ptr<scalar_t>(),
            boxes.const_data_ptr<acc_t>(),
            kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr,
            kDeformable ? offsets.size(2) : 1,
            features.size(1),
            features.size(2),
            features.size(3),
            spec.out_h,
            spec.out_w,
            static_cast<acc_t>(spec.spatial_scale),
            spec.aligned,
            static_cast<acc_t>(spec.gamma),
            grad_positions.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grad_positions;
}

// Same contract as cpu::backward.
template <typename scalar_t, bool kDeformable>
std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec,
    bool features_grad,
    bool positions_grad) {
  at::Tensor grad_features, grad_positions;
  if (features_grad) {
    grad_features = backward_features<scalar_t, kDeformable>(
        grad_output, boxes, offsets, features.sizes(), spec);
  }
  if (positions_grad) {
    grad_positions = backward_positions<scalar_t, kDeformable>(
        grad_output, features.contiguous(), boxes, offsets, spec);
  }
  return {grad_features, grad_positions};
}

}  // namespace cuda

// The kernel family, as a type for crop_sampling_ops.h.
struct CudaKernels {
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
