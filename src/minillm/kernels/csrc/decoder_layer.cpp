// Every decoder layer of a model on GGUF blocks in one op, for the engine's packed float32 step
// (model/ggml_decoder.py), each layer
//   h = x + wo(paged_attention(rope_cache_write(wqkv(rms_norm(x)))));  out = h + w2(swiglu(w13(rms_norm(h))))
// and the variants of Qwen3 and Gemma 2 / 3 (`Variant`): q and k RMS-normed per head before RoPE, the sliding
// layers' own RoPE tables, the attention and MLP outputs RMS-normed before their residual adds (sandwich),
// GeGLU (gelu with the tanh approximation) instead of SwiGLU, soft-capped attention scores.
// The same kernels and ATen ops in the same order as the PyTorch modules run them (so the same bits), called
// from C++, so that no Python module call or op dispatch runs between them.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "ops.h"

namespace {

// One linear layer: its tensors and their GGML types (several where it stacks tensors of different types)
struct Weights {
  at::TensorList tensors;
  at::IntArrayRef formats;
};

// What a model's layers compute beyond a Llama layer's (the same for every layer)
struct Variant {
  bool qk_norm, sandwich, gelu;
  double softcap;
};

// A layer's RMSNorm weights: attention_norm, ffn_norm, then q_norm, k_norm (qk_norm), then post_attention_norm,
// post_ffn_norm (sandwich)
struct Norms {
  at::TensorList w;
  const at::Tensor& attention() const { return w[0]; }
  const at::Tensor& ffn() const { return w[1]; }
  const at::Tensor& q() const { return w[2]; }
  const at::Tensor& k() const { return w[3]; }
  const at::Tensor& post_attention() const { return w[w.size() - 2]; }
  const at::Tensor& post_ffn() const { return w[w.size() - 1]; }
};

at::Tensor decoder_layer(const at::Tensor& x, const Norms& norms, double eps, const Variant& variant,
                         const Weights& wqkv, const std::optional<at::Tensor>& bqkv, const Weights& wo,
                         const Weights& w13, const Weights& w2, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slots,
                         const at::Tensor& block_table, const at::Tensor& seqlens, const at::Tensor& query_start,
                         int64_t num_heads, int64_t num_kv_heads, double scale, int64_t window, int64_t gemm_from) {
  // the attention kernel lives in another library (one per x86 level): through the dispatcher
  static auto paged_attention = c10::Dispatcher::singleton()
      .findSchemaOrThrow("minillm::paged_attention", "")
      .typed<at::Tensor(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t, double)>();
  // the norms fused into the matmuls' quantization, the skip connections into their output loops
  at::Tensor qkv =
      minillm::ggml_linear_normed(x, norms.attention(), eps, wqkv.tensors, wqkv.formats, bqkv, false, gemm_from);
  qkv = qkv.view({-1, qkv.size(-1)});
  if (variant.qk_norm) {  // as attention/paged_cpu.py's rope_cache_write does before the kernel
    const int64_t n = qkv.size(0), d = k_pool.size(-1);
    const auto q_k_v = qkv.split_with_sizes({num_heads * d, num_kv_heads * d, num_kv_heads * d}, -1);
    qkv = at::cat({minillm::rms_norm(q_k_v[0].view({n, num_heads, d}), norms.q(), eps).view({n, -1}),
                   minillm::rms_norm(q_k_v[1].view({n, num_kv_heads, d}), norms.k(), eps).view({n, -1}), q_k_v[2]},
                  -1);
  }
  const at::Tensor q = minillm::rope_cache_write(qkv, cos, sin, k_pool, v_pool, slots, num_heads, num_kv_heads);
  const at::Tensor attn =
      paged_attention.call(q, k_pool, v_pool, block_table, seqlens, query_start, scale, window, variant.softcap);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = -1;
  const at::Tensor o = attn.view(shape);
  // a sandwich norm comes between a matmul and its residual add, which is otherwise fused into its output loop
  const auto residual = [&](const at::Tensor& r) { return variant.sandwich ? std::nullopt : std::optional(r); };
  at::Tensor h =
      minillm::ggml_linear(o, wo.tensors, wo.formats, o.size(-1), std::nullopt, false, gemm_from, residual(x));
  if (variant.sandwich) h = x + minillm::rms_norm(h, norms.post_attention(), eps);
  at::Tensor f = minillm::ggml_linear_normed(h, norms.ffn(), eps, w13.tensors, w13.formats, std::nullopt,
                                             !variant.gelu, gemm_from);
  if (variant.gelu) {
    const auto gate_up = f.chunk(2, -1);
    f = at::gelu(gate_up[0], "tanh") * gate_up[1];
  }
  const at::Tensor out = minillm::ggml_linear(f, w2.tensors, w2.formats, f.size(-1), std::nullopt, false, gemm_from,
                                              residual(h));
  return variant.sandwich ? h + minillm::rms_norm(out, norms.post_ffn(), eps) : out;
}

// Every layer of the model in turn (layer l: its norms, 2 to 6 as `Norms` lists them; linear layers 4l .. 4l + 3 as
// wqkv, wo, w13, w2, linear i made of parts[i] consecutive tensors of `weights` and their `formats`; pools l;
// the local RoPE tables where local_rope[l]): one call a step, not one a layer, whose ~25 arguments would be
// parsed again each time.
at::Tensor decoder_layers(const at::Tensor& x, at::TensorList norms, at::TensorList weights, at::IntArrayRef formats,
                          at::IntArrayRef parts, const c10::List<std::optional<at::Tensor>>& biases, double eps,
                          const at::Tensor& cos, const at::Tensor& sin, const std::optional<at::Tensor>& local_cos,
                          const std::optional<at::Tensor>& local_sin, at::TensorList k_pools, at::TensorList v_pools,
                          const at::Tensor& slots, const at::Tensor& block_table, const at::Tensor& seqlens,
                          const at::Tensor& query_start, int64_t num_heads, int64_t num_kv_heads, double scale,
                          at::IntArrayRef windows, at::IntArrayRef local_rope, bool qk_norm, bool sandwich, bool gelu,
                          double softcap, int64_t gemm_from) {
  const int64_t n = static_cast<int64_t>(k_pools.size()), per = 2 + 2 * qk_norm + 2 * sandwich;
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == per * n && static_cast<int64_t>(parts.size()) == 4 * n &&
                  weights.size() == formats.size() && static_cast<int64_t>(biases.size()) == n &&
                  static_cast<int64_t>(v_pools.size()) == n && static_cast<int64_t>(windows.size()) == n &&
                  static_cast<int64_t>(local_rope.size()) == n,
              "decoder_layers: per layer ", per, " norms, 4 linear layers, a bias, K and V pools, a window and a "
              "local-RoPE flag");
  std::vector<Weights> linears;
  size_t at = 0;
  for (const int64_t count : parts) {
    TORCH_CHECK(count > 0 && at + count <= weights.size(), "decoder_layers: parts do not match the weights");
    linears.push_back({weights.slice(at, count), formats.slice(at, count)});
    at += count;
  }
  TORCH_CHECK(at == weights.size(), "decoder_layers: parts do not match the weights");
  const bool any_local = std::any_of(local_rope.begin(), local_rope.end(), [](int64_t f) { return f != 0; });
  TORCH_CHECK(!any_local || (local_cos && local_sin), "decoder_layers: local RoPE layers need the local tables");
  const Variant variant{qk_norm, sandwich, gelu, softcap};
  at::Tensor h = x;
  for (int64_t l = 0; l < n; ++l) {
    at::Tensor k = k_pools[l], v = v_pools[l];
    const bool local = local_rope[l] != 0;
    h = decoder_layer(h, Norms{norms.slice(per * l, per)}, eps, variant, linears[4 * l], biases.get(l),
                      linears[4 * l + 1], linears[4 * l + 2], linears[4 * l + 3], local ? *local_cos : cos,
                      local ? *local_sin : sin, k, v, slots, block_table, seqlens, query_start, num_heads,
                      num_kv_heads, scale, windows[l], gemm_from);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("decoder_layers(Tensor x, Tensor[] norms, Tensor[] weights, int[] formats, int[] parts, Tensor?[] biases, "
        "float eps, Tensor cos, Tensor sin, Tensor? local_cos, Tensor? local_sin, Tensor(a!)[] k_pools, "
        "Tensor(b!)[] v_pools, Tensor slots, Tensor block_table, Tensor seqlens, Tensor query_start, int num_heads, "
        "int num_kv_heads, float scale, int[] windows, int[] local_rope, bool qk_norm, bool sandwich, bool gelu, "
        "float softcap, int gemm_from) -> Tensor");
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("decoder_layers", &decoder_layers);
}
