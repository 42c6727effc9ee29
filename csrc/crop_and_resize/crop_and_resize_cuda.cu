// crop_and_resize on the CUDA dispatch key (the op bodies are in crop_and_resize.h).
#include <torch/library.h>

#include "common/crop_sampling_cuda.cuh"
#include "crop_and_resize/crop_and_resize.h"

TORCH_LIBRARY_IMPL(masklab, CUDA, m) {
  m.impl("crop_and_resize", &masklab::crop_and_resize<masklab::CudaKernels>);
  m.impl("_crop_and_resize_backward", &masklab::crop_and_resize_backward<masklab::CudaKernels>);
}
