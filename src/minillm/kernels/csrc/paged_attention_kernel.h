// Attention over a paged KV cache on CPU, for a packed batch of variable-length query chunks:
// decode rows (one query each) and prefill chunks (many) in one call.
//
// Why a kernel: in PyTorch ops, paged attention is a gather of every sequence's pages into a padded
// copy, then a masked SDPA over the padding, which at a few dozen decoding sequences cost more than the
// layer's matmuls. Here each task reads its pages in place.
//
// q [N, Hq, D]: sequence b's new tokens are rows query_start[b] .. query_start[b+1] of q, and they are
// that sequence's last keys, so its query j of n sees keys 0 .. seqlens[b] - n + j (causal, aligned
// bottom-right), or with `window` > 0 only its last `window` of them (sliding-window attention, Mistral's);
// `softcap` > 0 caps each scaled score at softcap * tanh(score / softcap) (Gemma 2).
// k_pool, v_pool [num_blocks, page, Hkv, D] (q's dtype, or float16 for float32 q); block_table [B, pages];
// seqlens [B] (keys per sequence, the new ones included); query_start [B + 1]; all int64.
// Returns [N, Hq, D] in q's dtype. Scores and softmax in float32 (scores, then max / exp / sum, then P @ V).

// Included by one source per x86 level (paged_attention_{portable,avx2,avx512}.cpp), each built as its own
// library with that level's -march (kernels/flags.py): at::vec picks its vector width from these macros, set
// from the compiler's own feature macros, and only the library this CPU runs is ever loaded.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

using fVec = at::vec::Vectorized<float>;
constexpr int64_t W = fVec::size();

// The sum of a vector's lanes. at::vec's reduce_add does not compile in its non-vector (DEFAULT) build in
// every torch version: the portable build adds the lanes in order instead.
static inline float lane_sum(const fVec& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return v.reduce_add();
#else
  float lanes[W];
  v.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < W; ++i) sum += lanes[i];
  return sum;
#endif
}

static inline float to_float(float x) { return x; }
static inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
static inline float to_float(at::Half x) { return static_cast<float>(x); }
static inline fVec load(const float* p) { return fVec::loadu(p); }
static inline fVec load(const at::BFloat16* p) {  // widened to float32
  fVec out;
  at::vec::load_to_float(p, out);
  return out;
}
static inline fVec load(const at::Half* p) {
  fVec out;
  at::vec::load_to_float(p, out);
  return out;
}

// T: q and the output; KV: the pools (T, or float16 under float32 queries: the engine's 16-bit cache)
template <typename T, typename KV = T>
struct Problem {
  const T* q;
  const KV *k, *v;
  T* out;
  const int64_t *table, *seqlens, *query_start;
  int64_t num_seqs, num_heads, num_kv_heads, dim, page, max_pages;
  float scale;
  int64_t window;  // > 0: a query sees only its last `window` keys (sliding-window attention); 0: all
  float softcap;   // > 0: scores become softcap * tanh(score / softcap) (Gemma 2); 0: none
};

// Gemma 2's attention logit soft-capping, applied to a score after scaling
static inline float capped(float score, float softcap) {
  return softcap > 0.f ? softcap * std::tanh(score / softcap) : score;
}

// Call fn(t - begin, row) for keys begin <= t < count of one sequence, row pointing at key t's KV head h in `pool`:
// walks the block table a page at a time (no division per key), and asks for the next page while
// working on this one (pages are scattered over the pool, so the hardware prefetcher cannot guess them).
template <typename T, typename KV, typename Fn>
static inline void for_each_key(const Problem<T, KV>& p, const KV* pool, const int64_t* pages, int64_t h, int64_t dim,
                                int64_t begin, int64_t count, Fn fn) {
  const int64_t token_stride = p.num_kv_heads * dim;
  for (int64_t n = begin / p.page, first = n * p.page; first < count; first += p.page, ++n) {
    const KV* base = pool + pages[n] * p.page * token_stride + h * dim;
    if (first + p.page < count) {
      const char* next = reinterpret_cast<const char*>(pool + pages[n + 1] * p.page * token_stride + h * dim);
      for (int64_t i = 0; i < p.page; ++i)
        for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(KV)); byte += 64)
          __builtin_prefetch(next + i * token_stride * static_cast<int64_t>(sizeof(KV)) + byte);
    }
    const int64_t end = std::min(p.page, count - first);
    for (int64_t i = std::max<int64_t>(0, begin - first); i < end; ++i) fn(first + i - begin, base + i * token_stride);
  }
}

// for_each_key's keys handed on N at a time, fn(std::integral_constant<int64_t, N>, rows, t of the first), and
// the last ones (fewer than N) one at a time, fn(std::integral_constant<int64_t, 1>, ...)
template <int64_t N, typename T, typename KV, typename Fn>
static inline void for_each_batch(const Problem<T, KV>& p, const KV* pool, const int64_t* pages, int64_t h,
                                  int64_t dim, int64_t begin, int64_t count, Fn fn) {
  const KV* rows[N];
  int64_t held = 0, first = 0;
  for_each_key(p, pool, pages, h, dim, begin, count, [&](int64_t t, const KV* row) {
    if (held == 0) first = t;
    rows[held++] = row;
    if (held == N) fn(std::integral_constant<int64_t, N>{}, rows, first), held = 0;
  });
  for (int64_t j = 0; j < held; ++j) fn(std::integral_constant<int64_t, 1>{}, rows + j, first + j);
}

// softmax in place over each of `groups` rows of `len` scores (row stride `stride`, a multiple of W); with
// `stats`, each row's exponentials are left unnormalized and its peak and sum go to stats[2g], stats[2g + 1]
static void softmax_rows(float* scores, int64_t groups, int64_t len, int64_t stride, float* stats) {
  const int64_t full = len / W * W;
  for (int64_t g = 0; g < groups; ++g) {
    float* s = scores + g * stride;
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < len; ++t) peak = std::max(peak, s[t]);
    fVec total(0.f);
    for (int64_t t = 0; t < full; t += W) {
      const fVec e = (fVec::loadu(s + t) - fVec(peak)).exp_u20();
      e.store(s + t);
      total = total + e;
    }
    float sum = lane_sum(total);
    for (int64_t t = full; t < len; ++t) sum += (s[t] = std::exp(s[t] - peak));
    if (stats != nullptr) {
      stats[2 * g] = peak;
      stats[2 * g + 1] = sum;
      continue;
    }
    const float norm = sum > 0.f ? 1.f / sum : 0.f;  // a query with no keys outputs zeros
    for (int64_t t = 0; t < len; ++t) s[t] *= norm;
  }
}

// One query token against `len` keys, for the GROUPS query heads that share KV head h (each key
// loaded once for all of them). DIM (a multiple of W) and GROUPS are compile-time constants so the
// query rows and accumulators live in vector registers.
// With `part` (a span of a longer key range, see `run`), the unnormalized sums go to part->acc and the softmax
// peaks and sums to part->stats instead of o_row.
struct Part {
  float* acc;    // [GROUPS * DIM]
  float* stats;  // [GROUPS * 2]
};

template <typename T, typename KV, int64_t DIM, int64_t GROUPS>
struct VectorHead {
  static constexpr int64_t C = DIM / W;  // vectors per head row
  static_assert(DIM % W == 0, "head dim must be whole vectors");
  // Keys taken at once: each score is a chain of C multiply-adds, and one key's GROUPS chains alone left the
  // core waiting on the FMA's latency (Gemma-3's head dim 256, 4 heads a KV head: 4 GMAC/s a core on Zen 3).
  // GROUPS x KEYS chains in flight cover it. Every chain is summed in the same order whatever the batch, and
  // each output's value sums its keys in key order, so the bits do not depend on KEYS or VALUES.
  static constexpr int64_t KEYS = GROUPS >= 7 ? 1 : (8 + GROUPS - 1) / GROUPS;
  static constexpr int64_t VALUES = 4;

  // scores[g * stride + j] for keys key[0 .. N)
  template <int64_t N>
  static inline void score(const fVec (&query)[GROUPS][C], const KV* const* key, float* scores, int64_t stride,
                           float softcap) {
    fVec s[GROUPS][N];
    for (int64_t j = 0; j < N; ++j) {
      const fVec k = load(key[j]);
      for (int64_t g = 0; g < GROUPS; ++g) s[g][j] = query[g][0] * k;
    }
    for (int64_t c = 1; c < C; ++c)
      for (int64_t j = 0; j < N; ++j) {
        const fVec k = load(key[j] + c * W);
        for (int64_t g = 0; g < GROUPS; ++g) s[g][j] = at::vec::fmadd(query[g][c], k, s[g][j]);
      }
    for (int64_t g = 0; g < GROUPS; ++g)
      for (int64_t j = 0; j < N; ++j) scores[g * stride + j] = capped(lane_sum(s[g][j]), softcap);
  }

  // acc[g] += weights[g * stride + j] x value[j], for j = 0 .. N in order
  template <int64_t N>
  static inline void accumulate(fVec (&acc)[GROUPS][C], const KV* const* value, const float* weights, int64_t stride) {
    for (int64_t c = 0; c < C; ++c) {
      fVec v[N];
      for (int64_t j = 0; j < N; ++j) v[j] = load(value[j] + c * W);
      for (int64_t g = 0; g < GROUPS; ++g) {
        fVec a = acc[g][c];
        for (int64_t j = 0; j < N; ++j) a = at::vec::fmadd(fVec(weights[g * stride + j]), v[j], a);
        acc[g][c] = a;
      }
    }
  }

  __attribute__((noinline)) static void attend(const Problem<T, KV>& p, const T* q_row, T* o_row,
                                               const int64_t* pages, int64_t h, int64_t begin, int64_t end,
                                               std::vector<float>& scores, const Part* part) {
    const int64_t len = end - begin;
    const int64_t stride = (len + W - 1) / W * W;
    scores.resize(GROUPS * stride);
    fVec query[GROUPS][C], acc[GROUPS][C];
    for (int64_t g = 0; g < GROUPS; ++g)
      for (int64_t c = 0; c < C; ++c) {
        query[g][c] = load(q_row + g * DIM + c * W) * fVec(p.scale);
        acc[g][c] = fVec(0.f);
      }
    for_each_batch<KEYS>(p, p.k, pages, h, DIM, begin, end, [&](auto n, const KV* const* keys, int64_t t) {
      score<decltype(n)::value>(query, keys, scores.data() + t, stride, p.softcap);
    });
    softmax_rows(scores.data(), GROUPS, len, stride, part ? part->stats : nullptr);
    for_each_batch<VALUES>(p, p.v, pages, h, DIM, begin, end, [&](auto n, const KV* const* values, int64_t t) {
      accumulate<decltype(n)::value>(acc, values, scores.data() + t, stride);
    });
    float row[DIM];
    for (int64_t g = 0; g < GROUPS; ++g) {
      if (part) {
        for (int64_t c = 0; c < C; ++c) acc[g][c].store(part->acc + g * DIM + c * W);
        continue;
      }
      for (int64_t c = 0; c < C; ++c) acc[g][c].store(row + c * W);
      for (int64_t d = 0; d < DIM; ++d) o_row[g * DIM + d] = static_cast<T>(row[d]);
    }
  }
};

// Any head dim and group count: the same computation in plain loops.
template <typename T, typename KV>
struct AnyHead {
  __attribute__((noinline)) static void attend(const Problem<T, KV>& p, const T* q_row, T* o_row,
                                               const int64_t* pages, int64_t h, int64_t begin, int64_t end,
                                               std::vector<float>& scores, const Part* part) {
    const int64_t len = end - begin;
    const int64_t dim = p.dim, groups = p.num_heads / p.num_kv_heads, stride = (len + W - 1) / W * W;
    scores.resize(groups * stride);
    std::vector<float> acc(groups * dim, 0.f);
    for_each_key(p, p.k, pages, h, dim, begin, end, [&](int64_t t, const KV* key) {
      for (int64_t g = 0; g < groups; ++g) {
        float s = 0.f;
        for (int64_t d = 0; d < dim; ++d) s += to_float(q_row[g * dim + d]) * to_float(key[d]);
        scores[g * stride + t] = capped(s * p.scale, p.softcap);
      }
    });
    softmax_rows(scores.data(), groups, len, stride, part ? part->stats : nullptr);
    for_each_key(p, p.v, pages, h, dim, begin, end, [&](int64_t t, const KV* value) {
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += scores[g * stride + t] * to_float(value[d]);
    });
    for (int64_t i = 0; i < groups * dim; ++i) {
      if (part) part->acc[i] = acc[i];
      else o_row[i] = static_cast<T>(acc[i]);
    }
  }
};

// Work is split into tasks of (sequence, KV head, up to 16 queries), dealt to the threads longest
// first, each to the least loaded (keys to read as the cost): at::parallel_for alone would cut the
// task list into equal counts, and one long prefill chunk would then keep one core busy alone.
// A decode row with more than 128 keys has them cut into spans (flash-decoding), each a task: one task per KV
// head left a core idle for a third of the call with 3 KV heads on 2 threads, and at long contexts only as
// many cores as KV heads read K/V. Each span's softmax stays unnormalized beside its peak and sum, and the
// spans are merged in key order after the parallel part. A prompt query with as many keys takes the same
// spans inside its task. The span length depends on the query's own key count only, so its output depends
// neither on what else is in the call nor on how its prompt was chunked. Spans are not shorter than 128 keys:
// each starts its page walk with a cache miss, which short contexts would pay for.
constexpr int64_t kMaxSpans = 4;
static int64_t span_keys(int64_t keys) {  // >= keys / 4 in whole pages of 16, so at most kMaxSpans spans
  return std::max<int64_t>(128, (keys + 63) / 64 * 16);
}

// The keys query j of a sequence's n new tokens sees, [first, visible) of its `len`: causal, and its last
// `window` only with a sliding window.
struct KeyRange {
  int64_t first, visible;
};
template <typename T, typename KV>
static KeyRange key_range(const Problem<T, KV>& p, int64_t len, int64_t n, int64_t j) {
  const int64_t visible = std::max<int64_t>(0, len - n + j + 1);
  return {p.window > 0 ? std::max<int64_t>(0, visible - p.window) : 0, visible};
}

// One query row's spans merged, in key order: out = sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m), for each of
// `groups` query heads; acc [parts][groups][dim], stats [parts][groups][2] (peak, sum). Not inlined, nor is
// `attend`: their callers must run the same code (inlined, the compiler contracts multiply-adds differently at
// each call site, and a query's bits would depend on which path took it).
template <typename T>
__attribute__((noinline)) static void merge_spans(const float* acc, const float* stats, int64_t parts, int64_t groups,
                                                 int64_t dim, T* out) {
  for (int64_t g = 0; g < groups; ++g) {
    float peak = -std::numeric_limits<float>::infinity(), scale[kMaxSpans], sum = 0.f;
    for (int64_t s = 0; s < parts; ++s) peak = std::max(peak, stats[2 * (s * groups + g)]);
    for (int64_t s = 0; s < parts; ++s)
      sum += stats[2 * (s * groups + g) + 1] * (scale[s] = std::exp(stats[2 * (s * groups + g)] - peak));
    const float norm = sum > 0.f ? 1.f / sum : 0.f;
    for (int64_t d = 0; d < dim; ++d) {
      float value = 0.f;
      for (int64_t s = 0; s < parts; ++s) value += acc[(s * groups + g) * dim + d] * scale[s];
      out[g * dim + d] = static_cast<T>(value * norm);
    }
  }
}

template <typename T, typename KV, typename Head>
static void run(const Problem<T, KV>& p) {
  constexpr int64_t kQueriesPerTask = 16;
  struct Task { int64_t seq, head, first, end, cost, key_begin, key_end, part; };  // part: -1, or a span's slot
  struct Split { int64_t row, parts, first_part; };  // a decode row's q/out row, its spans' slots
  const int64_t groups = p.num_heads / p.num_kv_heads;
  std::vector<Task> tasks;
  std::vector<Split> splits;
  int64_t parts = 0;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t n = p.query_start[b + 1] - p.query_start[b];
    const int64_t len = std::min(p.seqlens[b], p.max_pages * p.page);
    if (n == 1) {
      const KeyRange range = key_range(p, len, 1, 0);
      const int64_t keys = range.visible - range.first, span = span_keys(keys);
      if (keys > span) {
        for (int64_t h = 0; h < p.num_kv_heads; ++h) {
          const int64_t row = p.query_start[b] * p.num_heads + h * groups;
          splits.push_back({row, (keys + span - 1) / span, parts});
          for (int64_t k0 = range.first; k0 < range.visible; k0 += span)
            tasks.push_back({b, h, 0, 1, std::min(span, range.visible - k0), k0, std::min(range.visible, k0 + span),
                             parts++});
        }
        continue;
      }
    }
    for (int64_t first = 0; first < n; first += kQueriesPerTask) {
      const int64_t end = std::min(n, first + kQueriesPerTask);
      const int64_t keys = p.window > 0 ? std::min(p.window, len - n + end) : len - n + end;
      for (int64_t h = 0; h < p.num_kv_heads; ++h) tasks.push_back({b, h, first, end, (end - first) * keys, 0, 0, -1});
    }
  }
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  const int64_t num_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks.size()));
  std::vector<std::vector<Task>> share(num_threads);
  std::vector<int64_t> load(num_threads, 0);
  for (const Task& task : tasks) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    share[t].push_back(task);
    load[t] += task.cost + 1;
  }
  std::vector<float> part_acc(parts * groups * p.dim), part_stats(parts * groups * 2);
  at::parallel_for(0, num_threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t thread = begin; thread < end; ++thread)
      for (const Task& task : share[thread]) {
        const int64_t n = p.query_start[task.seq + 1] - p.query_start[task.seq];
        const int64_t len = std::min(p.seqlens[task.seq], p.max_pages * p.page);
        const int64_t* pages = p.table + task.seq * p.max_pages;
        if (task.part >= 0) {
          const int64_t row = p.query_start[task.seq] * p.num_heads + task.head * groups;
          const Part part{part_acc.data() + task.part * groups * p.dim, part_stats.data() + task.part * groups * 2};
          Head::attend(p, p.q + row * p.dim, nullptr, pages, task.head, task.key_begin, task.key_end, scores, &part);
          continue;
        }
        std::vector<float> acc, stats;
        for (int64_t j = task.first; j < task.end; ++j) {
          const int64_t row = (p.query_start[task.seq] + j) * p.num_heads + task.head * groups;
          const auto [first_key, visible] = key_range(p, len, n, j);
          const int64_t keys = visible - first_key, span = span_keys(keys);
          if (keys <= span) {
            Head::attend(p, p.q + row * p.dim, p.out + row * p.dim, pages, task.head, first_key, visible, scores, nullptr);
            continue;
          }
          // a prompt query past 128 keys takes the same spans as a decode row, one after another here, so
          // a query's bits do not depend on how its prompt was chunked
          const int64_t count = (keys + span - 1) / span;
          acc.resize(count * groups * p.dim);
          stats.resize(count * groups * 2);
          for (int64_t s = 0; s < count; ++s) {
            const Part part{acc.data() + s * groups * p.dim, stats.data() + s * groups * 2};
            Head::attend(p, p.q + row * p.dim, nullptr, pages, task.head, first_key + s * span,
                         std::min(visible, first_key + (s + 1) * span), scores, &part);
          }
          merge_spans(acc.data(), stats.data(), count, groups, p.dim, p.out + row * p.dim);
        }
      }
  });
  at::parallel_for(0, static_cast<int64_t>(splits.size()), 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      merge_spans(part_acc.data() + splits[i].first_part * groups * p.dim,
                  part_stats.data() + splits[i].first_part * groups * 2, splits[i].parts, groups, p.dim,
                  p.out + splits[i].row * p.dim);
  });
}

template <typename T, typename KV>
static void dispatch(const Problem<T, KV>& p) {
  // compile-time shapes for the common cases: head dim 64, 96 (Phi-3), 128 or 256 (Gemma 2 / 3), 1-8 query heads
  // per KV head (Qwen2.5: 6, 7). AnyHead's plain loops held a Gemma-3-270M-shape prefill to 165 tok/s, these
  // reach ~450 (Zen 3)
  const int64_t groups = p.num_heads / p.num_kv_heads;
#define MINILLM_GROUPS(DIM)                                        \
  switch (groups) {                                                 \
    case 1: return run<T, KV, VectorHead<T, KV, DIM, 1>>(p);                \
    case 2: return run<T, KV, VectorHead<T, KV, DIM, 2>>(p);                \
    case 3: return run<T, KV, VectorHead<T, KV, DIM, 3>>(p);                \
    case 4: return run<T, KV, VectorHead<T, KV, DIM, 4>>(p);                \
    case 5: return run<T, KV, VectorHead<T, KV, DIM, 5>>(p);                \
    case 6: return run<T, KV, VectorHead<T, KV, DIM, 6>>(p);                \
    case 7: return run<T, KV, VectorHead<T, KV, DIM, 7>>(p);                \
    case 8: return run<T, KV, VectorHead<T, KV, DIM, 8>>(p);                \
    default: return run<T, KV, AnyHead<T, KV>>(p);                          \
  }
  if (p.dim == 64) { MINILLM_GROUPS(64) }
  if (p.dim == 96) { MINILLM_GROUPS(96) }
  if (p.dim == 128) { MINILLM_GROUPS(128) }
  if (p.dim == 256) { MINILLM_GROUPS(256) }
#undef MINILLM_GROUPS
  run<T, KV, AnyHead<T, KV>>(p);
}

at::Tensor paged_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor block_table,
                              at::Tensor seqlens, at::Tensor query_start, double scale, int64_t window,
                              double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 4 && k_pool.sizes() == v_pool.sizes(), "paged_attention: bad shapes");
  TORCH_CHECK(window >= 0, "paged_attention: window must be >= 0 (0: no sliding window)");
  const bool half_cache = q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kHalf;
  TORCH_CHECK((q.scalar_type() == k_pool.scalar_type() || half_cache) && k_pool.scalar_type() == v_pool.scalar_type(),
              "paged_attention: dtypes differ (q ", q.scalar_type(), ", pools ", k_pool.scalar_type(), " and ",
              v_pool.scalar_type(), "; float16 pools take float32 queries)");
  TORCH_CHECK(q.size(1) % k_pool.size(2) == 0 && q.size(2) == k_pool.size(3), "paged_attention: heads do not fit the pool");
  TORCH_CHECK(block_table.dim() == 2 && seqlens.numel() == block_table.size(0) &&
                  query_start.numel() == block_table.size(0) + 1,
              "paged_attention: block_table [B, pages], seqlens [B] and query_start [B + 1] disagree");
  q = q.contiguous();
  k_pool = k_pool.contiguous();
  v_pool = v_pool.contiguous();
  auto table = block_table.to(at::kLong).contiguous();
  auto lens = seqlens.to(at::kLong).contiguous();
  auto starts = query_start.to(at::kLong).contiguous();
  // cheap checks that keep every read inside the pools, whatever the caller passed
  const int64_t* start = starts.data_ptr<int64_t>();
  const int64_t* len = lens.data_ptr<int64_t>();
  const int64_t* ids = table.data_ptr<int64_t>();
  const int64_t page = k_pool.size(1), max_pages = table.size(1);
  TORCH_CHECK(start[0] == 0 && start[table.size(0)] == q.size(0), "paged_attention: query_start does not end at q's length");
  for (int64_t b = 0; b < table.size(0); ++b) {
    TORCH_CHECK(start[b + 1] >= start[b] && len[b] >= 0, "paged_attention: query_start must rise and seqlens be >= 0");
    const int64_t used = (std::min(len[b], max_pages * page) + page - 1) / page;
    for (int64_t i = 0; i < used; ++i)
      TORCH_CHECK(ids[b * max_pages + i] >= 0 && ids[b * max_pages + i] < k_pool.size(0),
                  "paged_attention: block_table names a block outside the pool");
  }
  auto out = at::zeros_like(q);
  auto problem = [&](auto* type, auto* cache_type) {
    using T = std::remove_pointer_t<decltype(type)>;
    using KV = std::remove_pointer_t<decltype(cache_type)>;
    return Problem<T, KV>{q.data_ptr<T>(), k_pool.data_ptr<KV>(), v_pool.data_ptr<KV>(), out.data_ptr<T>(),
                      table.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                      block_table.size(0), q.size(1), k_pool.size(2), q.size(2), k_pool.size(1), block_table.size(1),
                      static_cast<float>(scale), window, static_cast<float>(softcap)};
  };
  if (half_cache) {
    dispatch(problem(static_cast<float*>(nullptr), static_cast<at::Half*>(nullptr)));
  } else if (q.scalar_type() == at::kFloat) {
    dispatch(problem(static_cast<float*>(nullptr), static_cast<float*>(nullptr)));
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch(problem(static_cast<at::BFloat16*>(nullptr), static_cast<at::BFloat16*>(nullptr)));
  } else {
    TORCH_CHECK(false, "paged_attention: float32 or bfloat16 only");
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor seqlens, "
        "Tensor query_start, float scale, int window=0, float softcap=0.) -> Tensor");
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("paged_attention", &paged_attention); }
