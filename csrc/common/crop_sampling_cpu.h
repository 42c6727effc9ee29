// CPU kernels shared by crop_and_resize (kDeformable = false) and deformable_crop_and_resize.
//
// Every pass precomputes, per box, the bilinear corners of its out_h x out_w samples once and then
// sweeps the channels with a branch-free inner loop. Forward and position gradients are parallel
// over boxes; the feature gradient is parallel over (batch image, channel) planes, each plane owned
// by one thread, so the scatter needs no atomics and is deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <utility>
#include <vector>

#include "common/crop_geometry.h"
#include "common/crop_sampling.h"

namespace masklab {
namespace cpu {

template <typename acc_t, bool kDeformable>
BoxGeometry<acc_t> box_geometry(
    const acc_t* boxes,
    const acc_t* offsets,
    int64_t box,
    int64_t grid,
    const SamplingSpec& spec) {
  return BoxGeometry<acc_t>(
      boxes + box * 5,
      static_cast<acc_t>(spec.spatial_scale),
      spec.aligned,
      kDeformable ? offsets + box * 2 * grid * grid : nullptr,
      grid,
      static_cast<acc_t>(spec.gamma));
}

template <typename acc_t, bool kDeformable>
void setup_box_samples(
    const acc_t* boxes,
    const acc_t* offsets,
    int64_t box,
    int64_t grid,
    int64_t height,
    int64_t width,
    const SamplingSpec& spec,
    std::vector<BilinearSample<acc_t>>& samples) {
  const auto geometry = box_geometry<acc_t, kDeformable>(boxes, offsets, box, grid, spec);
  for (int64_t i = 0; i < spec.out_h; ++i) {
    for (int64_t j = 0; j < spec.out_w; ++j) {
      acc_t y, x;
      geometry.position(i, j, spec.out_h, spec.out_w, y, x);
      samples[i * spec.out_w + j].setup(y, x, height, width);
    }
  }
}

// Channels transposed per block in the forward pass (a [samples x block] tile stays in L1).
constexpr int64_t kTransposeBlock = 64;

// features [N, C, H, W] in any layout; boxes [K, 5] and offsets [K, 2, G, G] contiguous in acc_t.
//
// The forward pass reads the features channels-last (free when they already are), so each of a
// sample's four taps is a contiguous run of C values and the interpolation vectorises over
// channels; each box's [samples x C] result is then transposed into the NCHW output.
template <typename scalar_t, bool kDeformable>
at::Tensor forward(
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_boxes = boxes.size(0);
  const int64_t channels = features.size(1);
  const int64_t height = features.size(2);
  const int64_t width = features.size(3);
  const int64_t num_samples = spec.out_h * spec.out_w;
  const int64_t grid = kDeformable ? offsets.size(2) : 1;

  const auto features_nhwc = features.contiguous(at::MemoryFormat::ChannelsLast);
  auto output = at::empty({num_boxes, channels, spec.out_h, spec.out_w}, features.options());
  const scalar_t* feature_data = features_nhwc.const_data_ptr<scalar_t>();
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  const acc_t* offset_data = kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr;
  scalar_t* output_data = output.mutable_data_ptr<scalar_t>();

  at::parallel_for(0, num_boxes, 1, [&](int64_t begin, int64_t end) {
    std::vector<BilinearSample<acc_t>> samples(num_samples);
    std::vector<acc_t> tile(num_samples * kTransposeBlock);
    for (int64_t box = begin; box < end; ++box) {
      setup_box_samples<acc_t, kDeformable>(
          box_data, offset_data, box, grid, height, width, spec, samples);
      const int64_t batch = static_cast<int64_t>(box_data[box * 5]);
      const scalar_t* image = feature_data + batch * height * width * channels;
      scalar_t* out = output_data + box * channels * num_samples;
      for (int64_t c0 = 0; c0 < channels; c0 += kTransposeBlock) {
        const int64_t block = std::min(kTransposeBlock, channels - c0);
        for (int64_t s = 0; s < num_samples; ++s) {
          const auto& sample = samples[s];
          acc_t* __restrict__ values = tile.data() + s * kTransposeBlock;
          if (!sample.inside) {
            // Written as 0 without reading, so no inf/NaN can leak in through a zero weight.
            std::fill(values, values + block, static_cast<acc_t>(0));
            continue;
          }
          // Absent corners (beyond the last row/column) have weight 0 and index 0, which is
          // never read: they are skipped below.
          const scalar_t* __restrict__ p00 = image + sample.index[0] * channels + c0;
          const acc_t w00 = sample.weight[0];
          for (int64_t b = 0; b < block; ++b) {
            values[b] = w00 * static_cast<acc_t>(p00[b]);
          }
          for (int q = 1; q < 4; ++q) {
            if (!sample.present[q]) {
              continue;
            }
            const scalar_t* __restrict__ corner = image + sample.index[q] * channels + c0;
            const acc_t weight = sample.weight[q];
            for (int64_t b = 0; b < block; ++b) {
              values[b] += weight * static_cast<acc_t>(corner[b]);
            }
          }
        }
        for (int64_t b = 0; b < block; ++b) {
          scalar_t* __restrict__ out_plane = out + (c0 + b) * num_samples;
          for (int64_t s = 0; s < num_samples; ++s) {
            out_plane[s] = static_cast<scalar_t>(tile[s * kTransposeBlock + b]);
          }
        }
      }
    }
  });
  return output;
}

// Gradients w.r.t. the features ([N, C, H, W], if features_grad) and w.r.t. the sample positions
// ([K, out_h, out_w, 2] as (y, x) in acc_t, if positions_grad), in one pass.
//
// Work items are (image, block of channels): an item owns those channels of that image's feature
// gradient, so the scatter needs no atomics and is deterministic for a given thread count. Both
// gradients are computed channels-last, vectorised over the channels of a block; position
// gradients are summed per thread and reduced at the end.
template <typename scalar_t, bool kDeformable>
std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec,
    bool features_grad,
    bool positions_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_boxes = boxes.size(0);
  const int64_t batch_size = features.size(0);
  const int64_t channels = features.size(1);
  const int64_t height = features.size(2);
  const int64_t width = features.size(3);
  const int64_t num_samples = spec.out_h * spec.out_w;
  const int64_t grid = kDeformable ? offsets.size(2) : 1;
  const int64_t blocks_per_image = (channels + kTransposeBlock - 1) / kTransposeBlock;
  const int64_t num_threads = at::get_num_threads();

  const auto acc_options = grad_output.options().dtype(at::toOpMathType(grad_output.scalar_type()));
  at::Tensor features_nhwc, grad_features_nhwc, position_partials;
  if (positions_grad) {
    features_nhwc = features.contiguous(at::MemoryFormat::ChannelsLast);
    position_partials = at::zeros({num_threads, num_boxes, num_samples, 2}, acc_options);
  }
  if (features_grad) {
    grad_features_nhwc = at::zeros({batch_size, height, width, channels}, acc_options);
  }
  const scalar_t* feature_data = positions_grad ? features_nhwc.const_data_ptr<scalar_t>() : nullptr;
  acc_t* grad_feature_data = features_grad ? grad_features_nhwc.mutable_data_ptr<acc_t>() : nullptr;
  acc_t* partial_data = positions_grad ? position_partials.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  const acc_t* offset_data = kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* grad_out_data = grad_output.const_data_ptr<scalar_t>();

  // Boxes grouped by image (counting sort).
  std::vector<int64_t> group_start(batch_size + 1, 0);
  for (int64_t box = 0; box < num_boxes; ++box) {
    ++group_start[static_cast<int64_t>(box_data[box * 5]) + 1];
  }
  for (int64_t n = 0; n < batch_size; ++n) {
    group_start[n + 1] += group_start[n];
  }
  std::vector<int64_t> boxes_by_image(num_boxes);
  {
    std::vector<int64_t> fill(group_start.begin(), group_start.end() - 1);
    for (int64_t box = 0; box < num_boxes; ++box) {
      boxes_by_image[fill[static_cast<int64_t>(box_data[box * 5])]++] = box;
    }
  }

  at::parallel_for(0, batch_size * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<BilinearSample<acc_t>> samples(num_samples);
    std::vector<acc_t> tile(num_samples * kTransposeBlock);
    const std::vector<scalar_t> zeros(kTransposeBlock, static_cast<scalar_t>(0));
    acc_t* partial = positions_grad
        ? partial_data + at::get_thread_num() * num_boxes * num_samples * 2
        : nullptr;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t batch = item / blocks_per_image;
      const int64_t c0 = (item % blocks_per_image) * kTransposeBlock;
      const int64_t block = std::min(kTransposeBlock, channels - c0);
      const scalar_t* image =
          positions_grad ? feature_data + batch * height * width * channels : nullptr;
      acc_t* grad_image =
          features_grad ? grad_feature_data + batch * height * width * channels : nullptr;
      for (int64_t g = group_start[batch]; g < group_start[batch + 1]; ++g) {
        const int64_t box = boxes_by_image[g];
        setup_box_samples<acc_t, kDeformable>(
            box_data, offset_data, box, grid, height, width, spec, samples);
        const scalar_t* grad_box = grad_out_data + (box * channels + c0) * num_samples;
        for (int64_t b = 0; b < block; ++b) {
          for (int64_t s = 0; s < num_samples; ++s) {
            tile[s * kTransposeBlock + b] = static_cast<acc_t>(grad_box[b * num_samples + s]);
          }
        }
        for (int64_t s = 0; s < num_samples; ++s) {
          const auto& sample = samples[s];
          if (!sample.inside) {
            continue;
          }
          const acc_t* __restrict__ grad = tile.data() + s * kTransposeBlock;
          if (features_grad) {
            for (int q = 0; q < 4; ++q) {
              if (!sample.present[q]) {
                continue;
              }
              acc_t* __restrict__ target = grad_image + sample.index[q] * channels + c0;
              const acc_t weight = sample.weight[q];
              for (int64_t b = 0; b < block; ++b) {
                target[b] += weight * grad[b];
              }
            }
          }
          if (positions_grad) {
            const scalar_t* corner[4];
            for (int q = 0; q < 4; ++q) {
              corner[q] = sample.present[q] ? image + sample.index[q] * channels + c0 : zeros.data();
            }
            // d value / dy = hx (f10 - f00) + lx (f11 - f01); d value / dx likewise.
            acc_t sum_y0 = 0, sum_y1 = 0, sum_x0 = 0, sum_x1 = 0;
            // Reassociating these sums (which -O3 alone may not) lets them vectorise.
#pragma omp simd reduction(+ : sum_y0, sum_y1, sum_x0, sum_x1)
            for (int64_t b = 0; b < block; ++b) {
              const acc_t f00 = static_cast<acc_t>(corner[0][b]);
              const acc_t f01 = static_cast<acc_t>(corner[1][b]);
              const acc_t f10 = static_cast<acc_t>(corner[2][b]);
              const acc_t f11 = static_cast<acc_t>(corner[3][b]);
              sum_y0 += grad[b] * (f10 - f00);
              sum_y1 += grad[b] * (f11 - f01);
              sum_x0 += grad[b] * (f01 - f00);
              sum_x1 += grad[b] * (f11 - f10);
            }
            const acc_t hy = static_cast<acc_t>(1) - sample.ly;
            const acc_t hx = static_cast<acc_t>(1) - sample.lx;
            partial[(box * num_samples + s) * 2] += hx * sum_y0 + sample.lx * sum_y1;
            partial[(box * num_samples + s) * 2 + 1] += hy * sum_x0 + sample.ly * sum_x1;
          }
        }
      }
    }
  });

  at::Tensor grad_features, grad_positions;
  if (features_grad) {
    // [N, H, W, C] viewed as [N, C, H, W]: a channels-last gradient. Autograd accepts any
    // strides, and a copy back to NCHW here would cost as much as the scatter for small crops.
    grad_features = grad_features_nhwc.permute({0, 3, 1, 2}).to(grad_output.scalar_type());
  }
  if (positions_grad) {
    grad_positions = position_partials.sum(0).view({num_boxes, spec.out_h, spec.out_w, 2});
  }
  return {grad_features, grad_positions};
}

}  // namespace cpu

// The kernel family, as a type for crop_sampling_ops.h.
struct CpuKernels {
  template <typename scalar_t, bool kDeformable, typename... Args>
  static at::Tensor forward(Args&&... args) {
    return cpu::forward<scalar_t, kDeformable>(std::forward<Args>(args)...);
  }
  template <typename scalar_t, bool kDeformable, typename... Args>
  static std::tuple<at::Tensor, at::Tensor> backward(Args&&... args) {
    return cpu::backward<scalar_t, kDeformable>(std::forward<Args>(args)...);
  }
};

}  // namespace masklab
