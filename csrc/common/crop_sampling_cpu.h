// CPU kernels shared by crop_and_resize (kDeformable = false) and deformable_crop_and_resize.
//
// Every pass precomputes, per box, the bilinear corners of its out_h x out_w samples once and then
// sweeps the channels. Two memory layouts:
//   * channels-last ([N, H, W, C]): each of a sample's four taps is a contiguous run of channels,
//     so the interpolation vectorises over channels. Used when the features already are
//     channels-last (the fast path), or after a copy when the crops touch a large part of the map.
//   * NCHW, read in place: a scalar gather per (channel, sample). Used for contiguous NCHW features
//     when the crops' samples are few against the map's pixels (see kNchwSampleFraction), where a
//     whole-map channels-last copy would cost more than the crops themselves.
// The forward and the position gradient are parallel over boxes, each box written by one thread.
// The feature gradient is parallel over (image, channel block) items, each owning that slice of
// the gradient and walking its boxes in a fixed order: no atomics, and the same bits for any
// thread count. The channel block shrinks with the thread count (down to 8 channels), so there
// are work items for every thread even for one image of 32 channels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
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
      samples[i * spec.out_w + j].setup(y, x, height, width, spec.aligned);
    }
  }
}

// Channels per [samples x block] transpose tile in the channels-last kernels.
constexpr int64_t kTransposeBlock = 64;
// The smallest channel block of a feature-gradient work item: below this the per-box sample
// setup, repeated by every item, outweighs the channels it is spent on.
constexpr int64_t kMinGradBlock = 8;

// How a call reads the features (see the top of this file).
enum class Layout { kChannelsLast, kNchw, kCopyToChannelsLast };

// Read NCHW in place when the crops' samples number at most this fraction of the map's pixels.
// The channels-last copy streams the map once (about 8 bytes per element: read and write); the
// NCHW gather then saves it, but each sample reads two rows' cache lines in every channel plane
// for 4 useful values (about 128 bytes per sample and channel, against about 16 channels-last),
// so the gather only wins for sparse crops: K * S^2 below roughly 8 / 112 of N * H * W. A
// 1-thread check on a busy 2-core machine agreed (P2 of 800x1216, 512 boxes, 7x7, ratio 0.21:
// the gather took about 1.8x the copy plus the channels-last kernel). Sparse crops are common:
// a mask head at test time, with tens of detections, on FPN's large levels.
constexpr double kNchwSampleFraction = 1.0 / 16;

inline Layout choose_layout(const at::Tensor& features, int64_t num_boxes, int64_t num_samples) {
  if (features.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return Layout::kChannelsLast;
  }
  const double pixels = static_cast<double>(features.size(0)) * features.size(2) * features.size(3);
  if (features.is_contiguous() &&
      static_cast<double>(num_boxes) * num_samples <= kNchwSampleFraction * pixels) {
    return Layout::kNchw;
  }
  return Layout::kCopyToChannelsLast;
}

inline const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kChannelsLast:
      return "channels_last";
    case Layout::kNchw:
      return "nchw";
    default:
      return "copy_to_channels_last";
  }
}

// Channels per feature-gradient work item: the fewest blocks of at most kTransposeBlock channels
// whose number is a multiple of the thread count, so that each thread can take the same channels
// of every image (see feature_gradient); at least kMinGradBlock channels (or C).
inline int64_t gradient_channel_block(int64_t channels) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (channels + threads - 1) / threads;
  const int64_t blocks_per_thread = std::max<int64_t>(
      1, (per_thread + kTransposeBlock - 1) / kTransposeBlock);
  int64_t block = (channels + threads * blocks_per_thread - 1) / (threads * blocks_per_thread);
  block = (block + kMinGradBlock - 1) / kMinGradBlock * kMinGradBlock;
  return std::max<int64_t>(1, std::min({block, kTransposeBlock, std::max(channels, int64_t(1))}));
}

// ---------------------------------------------------------------------------------------------
// Forward

// Channels-last: each sample's taps are contiguous channel runs; a box's [samples x block] result
// is transposed into the NCHW output.
template <typename scalar_t, typename acc_t, bool kDeformable>
void forward_channels_last(
    const scalar_t* feature_data,
    const acc_t* box_data,
    const acc_t* offset_data,
    int64_t num_boxes,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t grid,
    const SamplingSpec& spec,
    scalar_t* output_data) {
  const int64_t num_samples = spec.out_h * spec.out_w;
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
}

// NCHW in place: per channel plane, a gather of each sample's present corners.
template <typename scalar_t, typename acc_t, bool kDeformable>
void forward_nchw(
    const scalar_t* feature_data,
    const acc_t* box_data,
    const acc_t* offset_data,
    int64_t num_boxes,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t grid,
    const SamplingSpec& spec,
    scalar_t* output_data) {
  const int64_t num_samples = spec.out_h * spec.out_w;
  const int64_t plane_size = height * width;
  at::parallel_for(0, num_boxes, 1, [&](int64_t begin, int64_t end) {
    std::vector<BilinearSample<acc_t>> samples(num_samples);
    for (int64_t box = begin; box < end; ++box) {
      setup_box_samples<acc_t, kDeformable>(
          box_data, offset_data, box, grid, height, width, spec, samples);
      const int64_t batch = static_cast<int64_t>(box_data[box * 5]);
      for (int64_t c = 0; c < channels; ++c) {
        const scalar_t* __restrict__ plane = feature_data + (batch * channels + c) * plane_size;
        scalar_t* __restrict__ out = output_data + (box * channels + c) * num_samples;
        for (int64_t s = 0; s < num_samples; ++s) {
          const auto& sample = samples[s];
          acc_t value = 0;
          for (int q = 0; q < 4; ++q) {
            if (sample.present[q]) {
              value += sample.weight[q] * static_cast<acc_t>(plane[sample.index[q]]);
            }
          }
          out[s] = static_cast<scalar_t>(value);
        }
      }
    }
  });
}

// features [N, C, H, W] in any layout; boxes [K, 5] and offsets [K, 2, G, G] contiguous in acc_t.
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
  auto output = at::empty({num_boxes, channels, spec.out_h, spec.out_w}, features.options());
  if (output.numel() == 0) {
    return output;  // no boxes (an FPN level without any): skip the layout work below
  }
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  const acc_t* offset_data = kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr;
  scalar_t* output_data = output.mutable_data_ptr<scalar_t>();
  const Layout layout = choose_layout(features, num_boxes, num_samples);
  if (layout == Layout::kNchw) {
    forward_nchw<scalar_t, acc_t, kDeformable>(
        features.const_data_ptr<scalar_t>(), box_data, offset_data, num_boxes, channels, height,
        width, grid, spec, output_data);
  } else {
    const auto features_nhwc = features.contiguous(at::MemoryFormat::ChannelsLast);
    forward_channels_last<scalar_t, acc_t, kDeformable>(
        features_nhwc.const_data_ptr<scalar_t>(), box_data, offset_data, num_boxes, channels,
        height, width, grid, spec, output_data);
  }
  return output;
}

// ---------------------------------------------------------------------------------------------
// Backward

// Boxes grouped by image, in box order (a counting sort): returns (group_start [N + 1],
// boxes_by_image [K]).
template <typename acc_t>
std::pair<std::vector<int64_t>, std::vector<int64_t>> group_boxes_by_image(
    const acc_t* box_data, int64_t num_boxes, int64_t batch_size) {
  std::vector<int64_t> group_start(batch_size + 1, 0);
  for (int64_t box = 0; box < num_boxes; ++box) {
    ++group_start[static_cast<int64_t>(box_data[box * 5]) + 1];
  }
  for (int64_t n = 0; n < batch_size; ++n) {
    group_start[n + 1] += group_start[n];
  }
  std::vector<int64_t> boxes_by_image(num_boxes);
  std::vector<int64_t> fill(group_start.begin(), group_start.end() - 1);
  for (int64_t box = 0; box < num_boxes; ++box) {
    boxes_by_image[fill[static_cast<int64_t>(box_data[box * 5])]++] = box;
  }
  return {std::move(group_start), std::move(boxes_by_image)};
}

// Feature gradient into grad_data (acc_t, zeroed) laid out like the features read by `layout`:
// [N, H, W, C] for the channels-last layouts, [N, C, H, W] for kNchw.
template <typename scalar_t, typename acc_t, bool kDeformable>
void feature_gradient(
    Layout layout,
    const scalar_t* grad_out_data,
    const acc_t* box_data,
    const acc_t* offset_data,
    int64_t num_boxes,
    int64_t batch_size,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t grid,
    const SamplingSpec& spec,
    acc_t* grad_data) {
  const int64_t num_samples = spec.out_h * spec.out_w;
  const int64_t plane_size = height * width;
  const int64_t block_size = gradient_channel_block(channels);
  const int64_t blocks_per_image = (channels + block_size - 1) / block_size;
  const auto groups = group_boxes_by_image(box_data, num_boxes, batch_size);
  const auto& group_start = groups.first;
  const auto& boxes_by_image = groups.second;
  const bool channels_last = layout != Layout::kNchw;

  // Each thread takes a range of channel blocks and does them for every image in turn: its share
  // of every image is the same however the boxes fall over the images (split by image, one
  // image with most of the boxes lands on one thread), and one image's blocks stay together.
  // With fewer blocks than threads (few channels) the (image, block) pairs are split instead.
  const bool split_blocks = blocks_per_image >= static_cast<int64_t>(at::get_num_threads());
  const int64_t num_items = split_blocks ? blocks_per_image : batch_size * blocks_per_image;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<BilinearSample<acc_t>> samples(num_samples);
    std::vector<acc_t> tile(channels_last ? num_samples * kTransposeBlock : 0);
    // Split by blocks: every image (pass) over this thread's blocks [begin, end).
    const int64_t passes = split_blocks ? batch_size : 1;
    const int64_t items = end - begin;
    for (int64_t step = 0; step < passes * items; ++step) {
      const int64_t item = begin + step % items;
      const int64_t batch = split_blocks ? step / items : item / blocks_per_image;
      const int64_t c0 = (split_blocks ? item : item % blocks_per_image) * block_size;
      const int64_t block = std::min(block_size, channels - c0);
      acc_t* grad_image = grad_data + batch * plane_size * channels;
      for (int64_t g = group_start[batch]; g < group_start[batch + 1]; ++g) {
        const int64_t box = boxes_by_image[g];
        setup_box_samples<acc_t, kDeformable>(
            box_data, offset_data, box, grid, height, width, spec, samples);
        const scalar_t* grad_box = grad_out_data + (box * channels + c0) * num_samples;
        if (!channels_last) {
          for (int64_t b = 0; b < block; ++b) {
            acc_t* __restrict__ plane = grad_image + (c0 + b) * plane_size;
            const scalar_t* __restrict__ grad = grad_box + b * num_samples;
            for (int64_t s = 0; s < num_samples; ++s) {
              const auto& sample = samples[s];
              if (!sample.inside) {
                continue;
              }
              const acc_t g_value = static_cast<acc_t>(grad[s]);
              for (int q = 0; q < 4; ++q) {
                if (sample.present[q]) {
                  plane[sample.index[q]] += sample.weight[q] * g_value;
                }
              }
            }
          }
          continue;
        }
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
      }
    }
  });
}

// Gradient w.r.t. the sample positions, [K, S, 2] as (d/dy, d/dx) in acc_t, one box per task:
// sums in a fixed order, the same for any thread count.
template <typename scalar_t, typename acc_t, bool kDeformable>
void position_gradient(
    Layout layout,
    const scalar_t* grad_out_data,
    const scalar_t* feature_data,
    const acc_t* box_data,
    const acc_t* offset_data,
    int64_t num_boxes,
    int64_t channels,
    int64_t height,
    int64_t width,
    int64_t grid,
    const SamplingSpec& spec,
    acc_t* grad_positions) {
  const int64_t num_samples = spec.out_h * spec.out_w;
  const int64_t plane_size = height * width;
  const bool channels_last = layout != Layout::kNchw;
  at::parallel_for(0, num_boxes, 1, [&](int64_t begin, int64_t end) {
    std::vector<BilinearSample<acc_t>> samples(num_samples);
    std::vector<acc_t> tile(channels_last ? num_samples * kTransposeBlock : 0);
    std::vector<acc_t> sums(num_samples * 4);
    const std::vector<scalar_t> zeros(kTransposeBlock, static_cast<scalar_t>(0));
    for (int64_t box = begin; box < end; ++box) {
      setup_box_samples<acc_t, kDeformable>(
          box_data, offset_data, box, grid, height, width, spec, samples);
      const int64_t batch = static_cast<int64_t>(box_data[box * 5]);
      const scalar_t* grad_box = grad_out_data + box * channels * num_samples;
      // Per sample: sum over channels of g * (f10 - f00), g * (f11 - f01), g * (f01 - f00),
      // g * (f11 - f10); d value / dy = hx (f10 - f00) + lx (f11 - f01), d / dx likewise.
      std::fill(sums.begin(), sums.end(), static_cast<acc_t>(0));
      if (channels_last) {
        const scalar_t* image = feature_data + batch * plane_size * channels;
        for (int64_t c0 = 0; c0 < channels; c0 += kTransposeBlock) {
          const int64_t block = std::min(kTransposeBlock, channels - c0);
          for (int64_t b = 0; b < block; ++b) {
            for (int64_t s = 0; s < num_samples; ++s) {
              tile[s * kTransposeBlock + b] =
                  static_cast<acc_t>(grad_box[(c0 + b) * num_samples + s]);
            }
          }
          for (int64_t s = 0; s < num_samples; ++s) {
            const auto& sample = samples[s];
            if (!sample.inside) {
              continue;
            }
            const acc_t* __restrict__ grad = tile.data() + s * kTransposeBlock;
            const scalar_t* corner[4];
            for (int q = 0; q < 4; ++q) {
              corner[q] =
                  sample.present[q] ? image + sample.index[q] * channels + c0 : zeros.data();
            }
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
            acc_t* total = sums.data() + s * 4;
            total[0] += sum_y0;
            total[1] += sum_y1;
            total[2] += sum_x0;
            total[3] += sum_x1;
          }
        }
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          const scalar_t* __restrict__ plane = feature_data + (batch * channels + c) * plane_size;
          const scalar_t* __restrict__ grad = grad_box + c * num_samples;
          for (int64_t s = 0; s < num_samples; ++s) {
            const auto& sample = samples[s];
            if (!sample.inside) {
              continue;
            }
            acc_t f[4];
            sample.corners(plane, f);
            BilinearSample<acc_t>::accumulate_position_sums(
                static_cast<acc_t>(grad[s]), f, sums.data() + s * 4);
          }
        }
      }
      acc_t* out = grad_positions + box * num_samples * 2;
      for (int64_t s = 0; s < num_samples; ++s) {
        // Exactly 0 outside and along a clamped axis, as on CUDA (crop_geometry.h).
        samples[s].position_gradient(sums.data() + s * 4, out[2 * s], out[2 * s + 1]);
      }
    }
  });
}

// Gradients w.r.t. the features ([N, C, H, W] laid out as empty_like(features), if
// features_grad) and w.r.t. the sample positions ([K, out_h, out_w, 2] as (y, x) in acc_t, if
// positions_grad).
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
  const auto acc_options = grad_output.options().dtype(at::toOpMathType(grad_output.scalar_type()));
  const acc_t* box_data = boxes.const_data_ptr<acc_t>();
  const acc_t* offset_data = kDeformable ? offsets.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* grad_out_data = grad_output.const_data_ptr<scalar_t>();
  const Layout layout = choose_layout(features, num_boxes, num_samples);
  const bool work = num_boxes > 0 && channels > 0;

  at::Tensor grad_features, grad_positions;
  if (features_grad) {
    // Returned in the layout of empty_like(features), as the fake kernel says. Accumulated in
    // acc_t: into the result itself when it has that dtype and the kernel's layout (fp32/fp64
    // NCHW read in place, or channels-last features), else into a buffer copied over once.
    grad_features = at::zeros_like(features);
    const bool kernel_layout_is_result = layout == Layout::kNchw
        ? grad_features.is_contiguous()
        : grad_features.is_contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor accumulator = grad_features;
    if (!kernel_layout_is_result || grad_features.scalar_type() != acc_options.dtype()) {
      accumulator = layout == Layout::kNchw
          ? at::zeros(features.sizes(), acc_options)
          : at::zeros({batch_size, height, width, channels}, acc_options).permute({0, 3, 1, 2});
    }
    if (work) {
      feature_gradient<scalar_t, acc_t, kDeformable>(
          layout, grad_out_data, box_data, offset_data, num_boxes, batch_size, channels, height,
          width, grid, spec, accumulator.mutable_data_ptr<acc_t>());
      if (!accumulator.is_same(grad_features)) {
        grad_features.copy_(accumulator);
      }
    }
  }
  if (positions_grad) {
    grad_positions = at::zeros({num_boxes, spec.out_h, spec.out_w, 2}, acc_options);
    if (work) {
      const auto features_read =
          layout == Layout::kNchw ? features : features.contiguous(at::MemoryFormat::ChannelsLast);
      position_gradient<scalar_t, acc_t, kDeformable>(
          layout, grad_out_data, features_read.const_data_ptr<scalar_t>(), box_data, offset_data,
          num_boxes, channels, height, width, grid, spec, grad_positions.mutable_data_ptr<acc_t>());
    }
  }
  return {grad_features, grad_positions};
}

}  // namespace cpu

// The kernel family, as a type for crop_sampling_ops.h.
struct CpuKernels {
  static constexpr bool kHostValueChecks = true;
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
