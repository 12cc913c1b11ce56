// The "ggml" library's ops as C++ functions, so that the decoder layer op (decoder_layer.cpp) calls them
// directly: through the dispatcher, each call's set-up code and tables are fetched again from memory after
// the previous matmul's weights have streamed through the caches.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace minillm {

// One row of RMSNorm, dst = w * (a * rsqrt(mean(a^2) + eps)) in float32 (as Llama / HF): the rms_norm op and
// the matmul's fused norm share it, so both give the same bits.
inline void rms_norm_row(const float* a, const float* w, int64_t dim, float eps, float* dst) {
  float sum = 0.f;
  for (int64_t i = 0; i < dim; ++i) sum += a[i] * a[i];
  const float inv = 1.f / std::sqrt(sum / dim + eps);
  for (int64_t i = 0; i < dim; ++i) dst[i] = w[i] * (a[i] * inv);
}

// `rows` rows of `dim` values normalized from src to dst, over PyTorch's threads.
inline void rms_norm_rows(const float* src, const float* w, int64_t rows, int64_t dim, float eps, float* dst) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(src + r * dim, w, dim, eps, dst + r * dim);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);  // layer_ops.cpp
at::Tensor rope_cache_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_pool,
                            at::Tensor& v_pool, const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads);

// ggml_matmul.cpp: the ggml_linear op, and the same on rms_norm(x, norm_weight, eps) with the norm fused into
// the activations' quantization (its rows never become a tensor; the same bits as the two ops in turn)
at::Tensor ggml_linear(const at::Tensor& x, at::TensorList weights, at::IntArrayRef fmts, int64_t in_features,
                       const std::optional<at::Tensor>& bias, bool swiglu, int64_t gemm_from,
                       const std::optional<at::Tensor>& residual);
at::Tensor ggml_linear_normed(const at::Tensor& x, const at::Tensor& norm_weight, double eps, at::TensorList weights,
                              at::IntArrayRef fmts, const std::optional<at::Tensor>& bias, bool swiglu,
                              int64_t gemm_from);

}  // namespace minillm
