// greedy_tokens(logits [B, V] float32) -> int64 [B]: per row the first index of the largest logit (as
// torch.argmax), or -1 when that logit is not finite or the row holds a NaN (the sampler then fails that
// row alone). torch.argmax is a scalar loop on CPU, slow next to a small model's decode token; here two SSE2
// passes (plain x86-64): the maximum, then where it first occurs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <emmintrin.h>

#include <cmath>
#include <limits>

namespace {

int64_t greedy_row(const float* x, int64_t v) {
  const float lowest = -std::numeric_limits<float>::infinity();
  __m128 top[4] = {_mm_set1_ps(lowest), _mm_set1_ps(lowest), _mm_set1_ps(lowest), _mm_set1_ps(lowest)};
  __m128 nan = _mm_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= v; i += 16)
    for (int k = 0; k < 4; ++k) {  // four independent chains
      const __m128 a = _mm_loadu_ps(x + i + 4 * k);
      top[k] = _mm_max_ps(a, top[k]);
      nan = _mm_or_ps(nan, _mm_cmpunord_ps(a, a));
    }
  float lane[4], best = lowest;
  _mm_storeu_ps(lane, _mm_max_ps(_mm_max_ps(top[0], top[1]), _mm_max_ps(top[2], top[3])));
  bool any_nan = _mm_movemask_ps(nan) != 0;
  for (float value : lane) best = std::max(best, value);
  for (; i < v; ++i) {
    any_nan |= std::isnan(x[i]);
    best = std::max(best, x[i]);
  }
  if (any_nan || !std::isfinite(best)) return -1;
  const __m128 target = _mm_set1_ps(best);
  for (i = 0; i + 4 <= v; i += 4)
    if (const int hit = _mm_movemask_ps(_mm_cmpeq_ps(_mm_loadu_ps(x + i), target))) return i + __builtin_ctz(hit);
  for (; i < v; ++i)
    if (x[i] == best) return i;
  return -1;  // not reached: best is one of the values
}

at::Tensor greedy_tokens(const at::Tensor& logits_in) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.scalar_type() == at::kFloat && logits_in.device().is_cpu(),
              "greedy_tokens: logits must be float32 [B, V] on CPU");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t rows = logits.size(0), v = logits.size(1);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) dst[r] = greedy_row(x + r * v, v);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minillm, m) { m.def("greedy_tokens(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("greedy_tokens", &greedy_tokens); }
