// Decode attention over a paged KV cache on CPU: one query token per sequence.
//
// Why a kernel: in PyTorch the same step is a gather of every sequence's pages into a padded copy,
// a layout copy and many tiny batched matmuls; at 64 sequences x 300 keys that costs ~5 ms per layer,
// while the keys and values themselves are ~15 MB (bf16), under 1 ms of memory traffic. Here each
// (sequence, KV head) task reads its pages in place, once, for all the query heads that share them.
//
// q [B, Hq, D]; k_pool, v_pool [num_blocks, page, Hkv, D] (q's dtype); block_table [B, pages] int64;
// seqlens [B] int64 (keys per row, the new one included); returns [B, Hq, D] in q's dtype.
// Scores and the softmax are float32 (two passes: scores, then max / exp / sum, then P @ V).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

static inline float to_float(float x) { return x; }
static inline float to_float(at::BFloat16 x) {  // bf16 is the top half of a float: a shift, vectorizable
  return c10::bit_cast<float>(static_cast<uint32_t>(x.x) << 16);
}

// DIM is the head dimension as a compile-time constant (0: read it at run time), so the inner loops
// unroll into whole vector registers.
template <typename T, int64_t DIM, int64_t GROUPS>
static void decode(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                   const torch::Tensor& block_table, const torch::Tensor& seqlens, double scale, torch::Tensor& out) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* table = block_table.data_ptr<int64_t>();
  const int64_t* lens = seqlens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t num_heads = q.size(1), num_kv_heads = k_pool.size(2), runtime_dim = q.size(2);
  const int64_t page = k_pool.size(1), max_pages = block_table.size(1);
  const float softmax_scale = static_cast<float>(scale);

  at::parallel_for(0, q.size(0) * num_kv_heads, 1, [=](int64_t begin, int64_t end) {
    // locals, not captures by reference: the compiler may then keep them in registers
    const int64_t dim = DIM ? DIM : runtime_dim, groups = GROUPS ? GROUPS : num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * dim;  // between consecutive tokens of one page
    std::vector<float> query(groups * dim), acc(groups * dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t len = std::min(lens[b], max_pages * page);
      const int64_t* pages = table + b * max_pages;
      const T* q_row = qp + (b * num_heads + h * groups) * dim;
      for (int64_t i = 0; i < groups * dim; ++i) {
        query[i] = to_float(q_row[i]) * softmax_scale;
        acc[i] = 0.f;
      }
      scores.assign(groups * len, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const T* key = kp + (pages[t / page] * page + t % page) * token_stride + h * dim;
        if constexpr (GROUPS > 0) {  // each key element loaded once for all the heads that share it
          float s[GROUPS] = {};
#pragma omp simd reduction(+ : s[:GROUPS])
          for (int64_t d = 0; d < dim; ++d) {
            const float k = to_float(key[d]);
            for (int64_t g = 0; g < GROUPS; ++g) s[g] += query[g * dim + d] * k;
          }
          for (int64_t g = 0; g < GROUPS; ++g) scores[g * len + t] = s[g];
        } else {
          for (int64_t g = 0; g < groups; ++g) {
            const float* qg = query.data() + g * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qg[d] * to_float(key[d]);
            scores[g * len + t] = s;
          }
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        float* sg = scores.data() + g * len;
        float peak = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t t = 0; t < len; ++t) peak = std::max(peak, sg[t]);
        for (int64_t t = 0; t < len; ++t) total += (sg[t] = std::exp(sg[t] - peak));
        const float norm = total > 0.f ? 1.f / total : 0.f;  // a row with no keys outputs zeros
        for (int64_t t = 0; t < len; ++t) sg[t] *= norm;
      }
      for (int64_t t = 0; t < len; ++t) {
        const T* value = vp + (pages[t / page] * page + t % page) * token_stride + h * dim;
        for (int64_t g = 0; g < groups; ++g) {
          const float p = scores[g * len + t];
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] += p * to_float(value[d]);
        }
      }
      T* o_row = op + (b * num_heads + h * groups) * dim;
      for (int64_t i = 0; i < groups * dim; ++i) o_row[i] = static_cast<T>(acc[i]);
    }
  });
}

template <typename T>
static void dispatch_dim(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                         const torch::Tensor& block_table, const torch::Tensor& seqlens, double scale, torch::Tensor& out) {
  // compile-time shapes for the common cases: head dim 64 or 128, 1-8 query heads per KV head
  const int64_t groups = q.size(1) / k_pool.size(2);
#define MINILLM_GROUPS(DIM)                                                              \
  switch (groups) {                                                                       \
    case 1: return decode<T, DIM, 1>(q, k_pool, v_pool, block_table, seqlens, scale, out); \
    case 2: return decode<T, DIM, 2>(q, k_pool, v_pool, block_table, seqlens, scale, out); \
    case 3: return decode<T, DIM, 3>(q, k_pool, v_pool, block_table, seqlens, scale, out); \
    case 4: return decode<T, DIM, 4>(q, k_pool, v_pool, block_table, seqlens, scale, out); \
    case 8: return decode<T, DIM, 8>(q, k_pool, v_pool, block_table, seqlens, scale, out); \
    default: return decode<T, DIM, 0>(q, k_pool, v_pool, block_table, seqlens, scale, out); \
  }
  if (q.size(2) == 64) { MINILLM_GROUPS(64) }
  if (q.size(2) == 128) { MINILLM_GROUPS(128) }
  decode<T, 0, 0>(q, k_pool, v_pool, block_table, seqlens, scale, out);
#undef MINILLM_GROUPS
}

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor block_table,
                           torch::Tensor seqlens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(), "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == k_pool.scalar_type() && q.scalar_type() == v_pool.scalar_type(), "paged_decode: dtypes differ");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && q.size(2) == k_pool.size(3), "paged_decode: heads do not fit the pool");
  q = q.contiguous();
  auto table = block_table.to(torch::kLong).contiguous();
  auto lens = seqlens.to(torch::kLong).contiguous();
  auto out = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat) {
    dispatch_dim<float>(q, k_pool.contiguous(), v_pool.contiguous(), table, lens, scale, out);
  } else if (q.scalar_type() == torch::kBFloat16) {
    dispatch_dim<at::BFloat16>(q, k_pool.contiguous(), v_pool.contiguous(), table, lens, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("paged_decode", &paged_decode); }
