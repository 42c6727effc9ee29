#include "common/crop_sampling.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace masklab {

void check_sampling_inputs(
    const char* op_name,
    const at::Tensor& features,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    int64_t out_h,
    int64_t out_w) {
  TORCH_CHECK(
      features.dim() == 4,
      op_name,
      ": features must be a 4-D [N, C, H, W] tensor, got shape ",
      features.sizes());
  TORCH_CHECK(
      boxes.dim() == 2 && boxes.size(1) == 5,
      op_name,
      ": boxes must be a [K, 5] tensor of (batch_index, x1, y1, x2, y2), got shape ",
      boxes.sizes());
  TORCH_CHECK(
      at::isFloatingType(features.scalar_type()),
      op_name,
      ": features must be floating point, got ",
      features.scalar_type());
  TORCH_CHECK(
      at::isFloatingType(boxes.scalar_type()),
      op_name,
      ": boxes must be floating point, got ",
      boxes.scalar_type());
  // Coordinates are computed in op-math (fp32 for half/bf16 features), so fp32 boxes keep their
  // precision with half features (detectron2 under AMP pools fp16 maps with fp32 boxes); any
  // other mix is more likely a mistake than a wish, and gradients return in the input's dtype.
  const auto geometry_dtype_ok = [&](at::ScalarType dtype) {
    return dtype == features.scalar_type() ||
        (dtype == at::kFloat &&
         (features.scalar_type() == at::kHalf || features.scalar_type() == at::kBFloat16));
  };
  TORCH_CHECK(
      geometry_dtype_ok(boxes.scalar_type()),
      op_name,
      ": boxes are ",
      boxes.scalar_type(),
      " but features are ",
      features.scalar_type(),
      "; pass boxes in the features' dtype (float32 boxes are also accepted with half or "
      "bfloat16 features)");
  TORCH_CHECK(
      boxes.device() == features.device(),
      op_name,
      ": boxes are on ",
      boxes.device(),
      " but features are on ",
      features.device());
  TORCH_CHECK(out_h > 0 && out_w > 0, op_name, ": output size must be positive, got (", out_h,
      ", ", out_w, ")");
  if (offsets.defined()) {
    TORCH_CHECK(
        offsets.dim() == 4 && offsets.size(0) == boxes.size(0) && offsets.size(1) == 2 &&
            offsets.size(2) == offsets.size(3) && offsets.size(2) > 0,
        op_name,
        ": offsets must be [K, 2, G, G] with K = ",
        boxes.size(0),
        " boxes, got shape ",
        offsets.sizes());
    const int64_t grid = offsets.size(2);
    TORCH_CHECK(
        out_h % grid == 0 && out_w % grid == 0,
        op_name,
        ": output size (",
        out_h,
        ", ",
        out_w,
        ") must be divisible by the offset grid ",
        grid);
    TORCH_CHECK(
        at::isFloatingType(offsets.scalar_type()),
        op_name,
        ": offsets must be floating point, got ",
        offsets.scalar_type());
    TORCH_CHECK(
        geometry_dtype_ok(offsets.scalar_type()),
        op_name,
        ": offsets are ",
        offsets.scalar_type(),
        " but features are ",
        features.scalar_type(),
        "; pass offsets in the features' dtype (float32 offsets are also accepted with half or "
        "bfloat16 features)");
    TORCH_CHECK(
        offsets.device() == features.device(),
        op_name,
        ": offsets are on ",
        offsets.device(),
        " but features are on ",
        features.device());
  }
}

namespace {

// Whether `value` stays finite when cast to `dtype` (float or double), as the kernels cast it.
bool finite_in(double value, at::ScalarType dtype) {
  return dtype == at::kDouble ? std::isfinite(value) : std::isfinite(static_cast<float>(value));
}

// torch's Python name of an opmath dtype, as the fake kernels print it.
const char* opmath_name(at::ScalarType dtype) {
  return dtype == at::kDouble ? "float64" : "float32";
}

}  // namespace

void check_sampling_parameters(
    const char* op_name,
    const at::Tensor& features,
    const SamplingSpec& spec,
    bool deformable) {
  const auto dtype = opmath_dtype(features);
  TORCH_CHECK(
      finite_in(spec.spatial_scale, dtype),
      op_name,
      ": spatial_scale must be finite (in ",
      opmath_name(dtype),
      ", the dtype sample positions are computed in), got ",
      spec.spatial_scale);
  if (deformable) {
    TORCH_CHECK(
        finite_in(spec.gamma, dtype),
        op_name,
        ": gamma must be finite (in ",
        opmath_name(dtype),
        ", the dtype sample positions are computed in), got ",
        spec.gamma);
  }
}

void check_grad_output(
    const char* op_name,
    const at::Tensor& grad_output,
    const at::Tensor& features,
    const at::Tensor& boxes) {
  TORCH_CHECK(
      grad_output.dim() == 4 && grad_output.size(0) == boxes.size(0) &&
          grad_output.size(1) == features.size(1),
      op_name,
      ": grad must be [K, C, out_h, out_w] = [",
      boxes.size(0),
      ", ",
      features.size(1),
      ", ...], got ",
      grad_output.sizes());
  TORCH_CHECK(
      grad_output.device() == features.device(),
      op_name,
      ": grad is on ",
      grad_output.device(),
      " but features are on ",
      features.device());
  TORCH_CHECK(
      grad_output.scalar_type() == features.scalar_type(),
      op_name,
      ": grad is ",
      grad_output.scalar_type(),
      " but features are ",
      features.scalar_type(),
      "; pass grad in the features' dtype (the dtype of the op's output)");
}

void check_box_values(
    const char* op_name,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    int64_t batch_size) {
  if (boxes.size(0) == 0) {
    return;
  }
  const auto batch_index = boxes.select(1, 0);
  // One reduction, one host sync: [any non-finite coordinate, any bad batch index, offsets].
  auto bad = at::stack({
      at::logical_not(at::isfinite(boxes)).any(),
      at::logical_or(
          at::logical_or(batch_index < 0, batch_index >= static_cast<double>(batch_size)),
          batch_index != at::floor(batch_index))
          .any(),
      offsets.defined() ? at::logical_not(at::isfinite(offsets)).any()
                        : at::zeros({}, boxes.options().dtype(at::kBool)),
  });
  const auto flags = bad.cpu();
  const bool* flag = flags.data_ptr<bool>();
  TORCH_CHECK(!flag[0], op_name, ": boxes contain NaN or infinite coordinates");
  TORCH_CHECK(
      !flag[1],
      op_name,
      ": box batch indices (column 0) must be integers in [0, ",
      batch_size,
      ") for a batch of ",
      batch_size,
      " feature maps");
  TORCH_CHECK(!flag[2], op_name, ": offsets contain NaN or infinite values");
}

namespace {

// Coefficients c_i of the end coordinate in sample i along an axis of `count` samples:
// position_i = start + c_i (end - start) (+ shift), so d/d start = 1 - c_i, d/d end = c_i.
at::Tensor end_coefficients(int64_t count, const at::TensorOptions& options) {
  if (count > 1) {
    return at::arange(count, options) / static_cast<double>(count - 1);
  }
  return at::full({1}, 0.5, options);
}

// grad * factor, but exactly 0 where grad is 0: a sample that reads 0 because its position
// overflowed (a box or shift near the float range) has a zero position gradient, and its factor
// (a box extent, gamma * offset) may be the inf that overflowed: 0 * inf would be NaN.
at::Tensor times_where_nonzero(const at::Tensor& grad, const at::Tensor& factor) {
  return at::where(grad != 0, grad * factor, at::zeros({}, grad.options()));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> position_gradients_to_box_and_offsets(
    const at::Tensor& grad_positions,
    const at::Tensor& boxes,
    const at::Tensor& offsets,
    const SamplingSpec& spec) {
  const auto options = grad_positions.options();
  const int64_t num_boxes = grad_positions.size(0);
  const auto grad_y = grad_positions.select(3, 0);  // [K, out_h, out_w]
  const auto grad_x = grad_positions.select(3, 1);
  const auto coeff_y = end_coefficients(spec.out_h, options).view({1, spec.out_h, 1});
  const auto coeff_x = end_coefficients(spec.out_w, options).view({1, 1, spec.out_w});

  // The offset shift gamma * o * (end - start) moves with both box edges as well.
  at::Tensor shift_y = at::zeros({1, 1, 1}, options);
  at::Tensor shift_x = at::zeros({1, 1, 1}, options);
  at::Tensor grad_offsets;
  if (offsets.defined()) {
    const int64_t grid = offsets.size(2);
    const int64_t cell_h = spec.out_h / grid;
    const int64_t cell_w = spec.out_w / grid;
    // [K, G, G] -> [K, out_h, out_w] by a broadcast view (repeat_interleave may read its repeat
    // count back to the host, a sync on CUDA).
    const auto expand = [&](const at::Tensor& per_cell) {
      return per_cell.reshape({num_boxes, grid, 1, grid, 1})
          .expand({num_boxes, grid, cell_h, grid, cell_w})
          .reshape({num_boxes, spec.out_h, spec.out_w});
    };
    const auto offsets_cast = offsets.to(options.dtype());
    shift_x = spec.gamma * expand(offsets_cast.select(1, 0));
    shift_y = spec.gamma * expand(offsets_cast.select(1, 1));

    // The box extent in feature pixels as the kernels compute it (BoxGeometry scales each edge
    // first), so that it overflows where theirs does and not where (x2 - x1) alone would.
    const auto boxes_cast = boxes.to(options.dtype());
    const auto feature_extent = [&](int64_t start, int64_t end) {
      return boxes_cast.select(1, end) * spec.spatial_scale -
          boxes_cast.select(1, start) * spec.spatial_scale;
    };
    const auto box_w = feature_extent(1, 3);
    const auto box_h = feature_extent(2, 4);
    const auto cell_sum = [&](const at::Tensor& grad) {  // [K, out_h, out_w] -> [K, G, G]
      return grad.reshape({num_boxes, grid, cell_h, grid, cell_w}).sum({2, 4});
    };
    grad_offsets = at::stack(
        {times_where_nonzero(cell_sum(grad_x), (spec.gamma * box_w).view({-1, 1, 1})),
         times_where_nonzero(cell_sum(grad_y), (spec.gamma * box_h).view({-1, 1, 1}))},
        1);
  }

  const auto end_y = coeff_y + shift_y;
  const auto end_x = coeff_x + shift_x;
  const auto grad_y2 = times_where_nonzero(grad_y, end_y).sum({1, 2});
  const auto grad_y1 = grad_y.sum({1, 2}) - grad_y2;
  const auto grad_x2 = times_where_nonzero(grad_x, end_x).sum({1, 2});
  const auto grad_x1 = grad_x.sum({1, 2}) - grad_x2;
  auto grad_boxes =
      at::stack({at::zeros_like(grad_x1), grad_x1, grad_y1, grad_x2, grad_y2}, 1) *
      spec.spatial_scale;
  return {grad_boxes, grad_offsets};
}

}  // namespace masklab
