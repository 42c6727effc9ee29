// Sampling geometry shared by crop_and_resize and deformable_crop_and_resize, on CPU and CUDA.
//
// Convention (TensorFlow's tf.image.crop_and_resize, expressed in feature-map pixels):
//   * a box (x1, y1, x2, y2) in input pixels maps to feature coordinates X = x * scale - offset,
//     offset = 0.5 when `aligned` (pixel centres at half-integers, as detectron2's ROIAlignV2),
//     else 0 (TensorFlow's corner-aligned convention);
//   * S > 1 samples along an axis lie on the box edges, evenly spaced: Y1 + i (Y2 - Y1) / (S - 1);
//     a single sample lies at the box centre; a flipped box (Y1 > Y2) gives a flipped crop;
//   * inside [0, H - 1] x [0, W - 1]: bilinear interpolation between floor(y) and floor(y) + 1,
//     where a corner beyond the last row/column contributes 0 (its weight is 0 there anyway);
//   * outside, the two conventions differ:
//       - aligned = false (TensorFlow): a sample outside [0, H - 1] x [0, W - 1] reads 0 (no
//         clamping, no partial blend). This is F.grid_sample(align_corners=True, zeros padding)
//         masked to in-range samples.
//       - aligned = true (RoIAlign's border rule, as torchvision's roi_align and detectron2's
//         ROIAlignV2): a sample within one pixel outside the map, y in [-1, 0) or (H - 1, H] (x
//         likewise), reads the border value, i.e. its coordinate is clamped to [0, H - 1]; a
//         sample farther out reads 0. Otherwise a box whose edge lies on the image border would
//         lose its outer row/column: with half-pixel centres the image edge is at -0.5. Along a
//         clamped axis the value does not depend on the position, so its position gradient is 0,
//         and the feature gradient goes to the border pixel.
//   * an empty map (H = 0 or W = 0) reads 0 everywhere.
//   * a sample whose position is not finite (finite boxes, offsets, spatial_scale and gamma can
//     still overflow the compute dtype, e.g. a box edge at 3e38 with scale 2 in fp32) is outside:
//     it reads 0 and has zero gradient, on every device.
//   * deformable: the S x S sample lattice is split into G x G groups of (S/G) x (S/G) samples
//     (the "sub-boxes"); group (gi, gj) is shifted by gamma * offsets[:, :, gi, gj] * (box_w,
//     box_h). With zero offsets this is exactly the plain crop.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MASKLAB_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MASKLAB_HOST_DEVICE inline
#endif

namespace masklab {

// Position of sample `index` of `count` along one axis of a box spanning [start, end].
template <typename T>
MASKLAB_HOST_DEVICE T sample_coordinate(T start, T end, int64_t index, int64_t count) {
  if (count > 1) {
    return start + (end - start) * static_cast<T>(index) / static_cast<T>(count - 1);
  }
  return static_cast<T>(0.5) * (start + end);
}

// The offset cell (sub-box) that sample (i, j) of an out_h x out_w lattice belongs to, as a
// row-major index into the G x G offset grid.
MASKLAB_HOST_DEVICE int64_t offset_cell(
    int64_t i, int64_t j, int64_t out_h, int64_t out_w, int64_t grid) {
  return (i / (out_h / grid)) * grid + j / (out_w / grid);
}

// One box, in feature coordinates, with its optional per-group offsets.
template <typename T>
struct BoxGeometry {
  int64_t batch_index;
  T y_start, y_end, x_start, x_end;
  // Row-major [2, grid, grid] offsets of this box (channel 0 = x, 1 = y), or nullptr.
  const T* offsets;
  int64_t grid;
  T gamma;

  // boxes_row: [batch_index, x1, y1, x2, y2] in input pixels.
  MASKLAB_HOST_DEVICE BoxGeometry(
      const T* boxes_row,
      T spatial_scale,
      bool aligned,
      const T* box_offsets,
      int64_t offset_grid,
      T offset_gamma)
      : offsets(box_offsets), grid(offset_grid), gamma(offset_gamma) {
    const T pixel_offset = aligned ? static_cast<T>(0.5) : static_cast<T>(0);
    batch_index = static_cast<int64_t>(boxes_row[0]);
    x_start = boxes_row[1] * spatial_scale - pixel_offset;
    y_start = boxes_row[2] * spatial_scale - pixel_offset;
    x_end = boxes_row[3] * spatial_scale - pixel_offset;
    y_end = boxes_row[4] * spatial_scale - pixel_offset;
  }

  // Sample (i, j) of an out_h x out_w lattice, in feature coordinates.
  MASKLAB_HOST_DEVICE void position(
      int64_t i, int64_t j, int64_t out_h, int64_t out_w, T& y, T& x) const {
    y = sample_coordinate(y_start, y_end, i, out_h);
    x = sample_coordinate(x_start, x_end, j, out_w);
    if (offsets != nullptr) {
      const int64_t cell = offset_cell(i, j, out_h, out_w, grid);
      x += gamma * offsets[cell] * (x_end - x_start);
      y += gamma * offsets[grid * grid + cell] * (y_end - y_start);
    }
  }
};

// Bilinear read of one sample: four flat indices into an H x W plane and their weights. Corners
// outside the plane get weight 0, index 0 and present = false; callers never read or write an
// absent corner, so a non-finite value elsewhere in the map cannot leak in through a zero weight.
template <typename T>
struct BilinearSample {
  int64_t index[4];  // (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)
  T weight[4];
  bool present[4];
  T ly, lx;  // fractional parts, for position gradients
  bool inside;
  // The position was clamped to the border along y / x (aligned rule): no position gradient there.
  bool clamped_y, clamped_x;

  // clamp_border: RoIAlign's rule for samples within one pixel outside the map (see the top of
  // this file); otherwise TensorFlow's (0 outside [0, H - 1] x [0, W - 1]).
  MASKLAB_HOST_DEVICE void setup(T y, T x, int64_t height, int64_t width, bool clamp_border) {
    const T last_y = static_cast<T>(height - 1);
    const T last_x = static_cast<T>(width - 1);
    const T margin = clamp_border ? static_cast<T>(1) : static_cast<T>(0);
    // Written positively: every comparison with NaN is false, so a NaN position (a box or shift
    // that overflowed the compute dtype, e.g. inf - inf) counts as outside and reads 0, and
    // floor() below only ever sees a finite position within the map (floor(NaN) cast to an
    // integer is undefined behaviour).
    inside = height > 0 && width > 0 && y >= -margin && y <= last_y + margin && x >= -margin &&
        x <= last_x + margin;
    clamped_y = clamped_x = false;
    if (!inside) {
      for (int q = 0; q < 4; ++q) {
        index[q] = 0;
        weight[q] = 0;
        present[q] = false;
      }
      ly = lx = 0;
      return;
    }
    if (y < 0 || y > last_y) {
      clamped_y = true;
      y = y < 0 ? static_cast<T>(0) : last_y;
    }
    if (x < 0 || x > last_x) {
      clamped_x = true;
      x = x < 0 ? static_cast<T>(0) : last_x;
    }
    const int64_t y0 = static_cast<int64_t>(floor(y));
    const int64_t x0 = static_cast<int64_t>(floor(x));
    ly = y - static_cast<T>(y0);
    lx = x - static_cast<T>(x0);
    const T hy = static_cast<T>(1) - ly;
    const T hx = static_cast<T>(1) - lx;
    // A clamped axis reads only its border row/column (the other corner has weight 0 and no
    // position gradient to feed).
    present[0] = true;
    present[1] = !clamped_x && x0 + 1 < width;
    present[2] = !clamped_y && y0 + 1 < height;
    present[3] = present[1] && present[2];
    const int64_t base = y0 * width + x0;
    const int64_t corner_index[4] = {base, base + 1, base + width, base + width + 1};
    const T corner_weight[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
    for (int q = 0; q < 4; ++q) {
      index[q] = present[q] ? corner_index[q] : 0;
      weight[q] = present[q] ? corner_weight[q] : static_cast<T>(0);
    }
  }

  // Corner values, with corners outside the plane read as 0.
  template <typename scalar_t>
  MASKLAB_HOST_DEVICE void corners(const scalar_t* plane, T values[4]) const {
    for (int q = 0; q < 4; ++q) {
      values[q] = present[q] ? static_cast<T>(plane[index[q]]) : static_cast<T>(0);
    }
  }

  // Adds one channel's share to the four per-sample sums that position_gradient() takes:
  // g (f10 - f00), g (f11 - f01), g (f01 - f00), g (f11 - f10), with corner values f as given by
  // corners() (absent corners read 0).
  MASKLAB_HOST_DEVICE static void accumulate_position_sums(T g, const T values[4], T sums[4]) {
    sums[0] += g * (values[2] - values[0]);
    sums[1] += g * (values[3] - values[1]);
    sums[2] += g * (values[1] - values[0]);
    sums[3] += g * (values[3] - values[2]);
  }

  // d(loss)/dy and d(loss)/dx of this sample from the channel sums of accumulate_position_sums:
  // d/dy = hx sums[0] + lx sums[1], d/dx = hy sums[2] + ly sums[3]. Outside the map, and along an
  // axis clamped to the border, the value does not depend on the position: the gradient is
  // exactly 0 there, without multiplying anything by 0, so a non-finite upstream gradient (inf,
  // NaN) gives 0 and not 0 * inf = NaN, the same on every device.
  MASKLAB_HOST_DEVICE void position_gradient(const T sums[4], T& grad_y, T& grad_x) const {
    const T hy = static_cast<T>(1) - ly;
    const T hx = static_cast<T>(1) - lx;
    grad_y = inside && !clamped_y ? hx * sums[0] + lx * sums[1] : static_cast<T>(0);
    grad_x = inside && !clamped_x ? hy * sums[2] + ly * sums[3] : static_cast<T>(0);
  }
};

}  // namespace masklab
