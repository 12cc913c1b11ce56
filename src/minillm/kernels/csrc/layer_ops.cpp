// Small fused float32 ops of a decoder layer, so that a decode step is a few kernel calls per layer
// instead of dozens of tiny PyTorch ops (each a few microseconds of dispatch, 30 layers per token).
//
// rms_norm(x, w, eps):  x * rsqrt(mean(x^2) + eps) * w over the last dim (as Llama / HF, in float32).
// rope_cache_write(qkv, cos, sin, k_pool, v_pool, slots, Hq, Hkv): the rows of qkv [N, (Hq + 2 Hkv) D] split
//   into q, k, v; q and k rotated ("rotate half" RoPE, cos/sin [N, D/2]); k and v written into the paged pools
//   [num_blocks * page = slots, Hkv, D] at slots[N] (float32 or float16 pools); returns q [N, Hq, D],
//   token-major, as the attention kernel reads it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "ops.h"

namespace minillm {

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && w_in.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  TORCH_CHECK(w.numel() == dim, "rms_norm: weight has ", w.numel(), " values for rows of ", dim);
  at::Tensor y = at::empty_like(x);
  const float *src = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  rms_norm_rows(src, wp, rows, dim, static_cast<float>(eps), dst);
  return y;
}

at::Tensor rope_cache_write(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                            at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slots_in, int64_t hq,
                            int64_t hkv) {
  const at::Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  const at::Tensor slots = slots_in.to(at::kLong).contiguous();
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && k_pool.scalar_type() == v_pool.scalar_type() &&
                  (k_pool.scalar_type() == at::kFloat || k_pool.scalar_type() == at::kHalf),
              "rope_cache_write: float32 activations, float32 or float16 pools");
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && k_pool.sizes() == v_pool.sizes(),
              "rope_cache_write: pools must be contiguous and alike");
  const int64_t n = slots.numel(), d = k_pool.size(-1), half = d / 2;
  TORCH_CHECK(qkv.numel() == n * (hq + 2 * hkv) * d && k_pool.size(-2) == hkv, "rope_cache_write: qkv has ",
              qkv.numel(), " values, expected ", n, " tokens x ", hq + 2 * hkv, " heads x ", d);
  TORCH_CHECK(cos.numel() == n * half && sin.numel() == n * half, "rope_cache_write: cos/sin must be [N, D/2]");
  const int64_t capacity = k_pool.numel() / (hkv * d);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "rope_cache_write: slot ", slot[t], " outside the pool");
  at::Tensor q = at::empty({n, hq, d}, qkv.options());
  const float *src = qkv.data_ptr<float>(), *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  float* qo = q.data_ptr<float>();
  const int64_t row = (hq + 2 * hkv) * d;
  auto write = [&](auto* kp, auto* vp) {  // the pools' element type: float, or c10::Half (rounded on the way in)
    using KV = std::remove_pointer_t<decltype(kp)>;
    at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* ct = c + t * half;
        const float* st = s + t * half;
        auto rotate = [&](const float* x, auto* out) {
          using Out = std::remove_pointer_t<decltype(out)>;
          for (int64_t i = 0; i < half; ++i) {
            out[i] = static_cast<Out>(x[i] * ct[i] - x[i + half] * st[i]);
            out[i + half] = static_cast<Out>(x[i + half] * ct[i] + x[i] * st[i]);
          }
        };
        const float* r = src + t * row;
        for (int64_t h = 0; h < hq; ++h) rotate(r + h * d, qo + (t * hq + h) * d);
        for (int64_t h = 0; h < hkv; ++h) {
          rotate(r + (hq + h) * d, kp + (slot[t] * hkv + h) * d);
          const float* v = r + (hq + hkv + h) * d;
          KV* dst = vp + (slot[t] * hkv + h) * d;
          for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<KV>(v[i]);
        }
      }
    });
  };
  if (k_pool.scalar_type() == at::kHalf)
    write(k_pool.data_ptr<at::Half>(), v_pool.data_ptr<at::Half>());
  else
    write(k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  return q;
}

}  // namespace minillm

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_cache_write(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, "
        "int num_heads, int num_kv_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("rms_norm", &minillm::rms_norm);
  m.impl("rope_cache_write", &minillm::rope_cache_write);
}
