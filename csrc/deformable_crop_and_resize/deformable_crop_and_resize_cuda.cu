// deformable_crop_and_resize on the CUDA dispatch key (the op bodies are in deformable_crop_and_resize.h).
#include <torch/library.h>

#include "common/crop_sampling_cuda.cuh"
#include "deformable_crop_and_resize/deformable_crop_and_resize.h"

TORCH_LIBRARY_IMPL(masklab, CUDA, m) {
  m.impl("deformable_crop_and_resize", &masklab::deformable_crop_and_resize<masklab::CudaKernels>);
  m.impl("_deformable_crop_and_resize_backward", &masklab::deformable_crop_and_resize_backward<masklab::CudaKernels>);
}
