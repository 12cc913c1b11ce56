// Every Llama decoder layer of a model on GGUF blocks in one op, for the engine's packed float32 step
// (model/ggml_decoder.py), each layer
//   h = x + wo(paged_attention(rope_cache_write(wqkv(rms_norm(x)))));  out = h + w2(swiglu(w13(rms_norm(h))))
// The same kernels in the same order as the PyTorch modules run them (so the same bits), called from C++,
// so that no Python module call or op dispatch runs between them.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

namespace {

// One linear layer: its tensors and their GGML types (several where it stacks tensors of different types)
struct Weights {
  at::TensorList tensors;
  at::IntArrayRef formats;
};

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& attention_norm, const at::Tensor& ffn_norm, double eps,
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
  const at::Tensor qkv =
      minillm::ggml_linear_normed(x, attention_norm, eps, wqkv.tensors, wqkv.formats, bqkv, false, gemm_from);
  const at::Tensor q = minillm::rope_cache_write(qkv.view({-1, qkv.size(-1)}), cos, sin, k_pool, v_pool, slots,
                                                 num_heads, num_kv_heads);
  const at::Tensor attn = paged_attention.call(q, k_pool, v_pool, block_table, seqlens, query_start, scale, window, 0.);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = -1;
  const at::Tensor o = attn.view(shape);
  const at::Tensor h = minillm::ggml_linear(o, wo.tensors, wo.formats, o.size(-1), std::nullopt, false, gemm_from, x);
  const at::Tensor f =
      minillm::ggml_linear_normed(h, ffn_norm, eps, w13.tensors, w13.formats, std::nullopt, true, gemm_from);
  return minillm::ggml_linear(f, w2.tensors, w2.formats, f.size(-1), std::nullopt, false, gemm_from, h);
}

// Every layer of the model in turn (layer l: norms 2l, 2l + 1; linear layers 4l .. 4l + 3 as wqkv, wo, w13, w2,
// linear i made of parts[i] consecutive tensors of `weights` and their `formats`; pools l): one call a step,
// not one a layer, whose ~25 arguments would be parsed again each time.
at::Tensor decoder_layers(const at::Tensor& x, at::TensorList norms, at::TensorList weights, at::IntArrayRef formats,
                          at::IntArrayRef parts, const c10::List<std::optional<at::Tensor>>& biases, double eps,
                          const at::Tensor& cos, const at::Tensor& sin, at::TensorList k_pools, at::TensorList v_pools,
                          const at::Tensor& slots, const at::Tensor& block_table, const at::Tensor& seqlens,
                          const at::Tensor& query_start, int64_t num_heads, int64_t num_kv_heads, double scale,
                          at::IntArrayRef windows, int64_t gemm_from) {
  const int64_t n = static_cast<int64_t>(k_pools.size());
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * n && static_cast<int64_t>(parts.size()) == 4 * n &&
                  weights.size() == formats.size() && static_cast<int64_t>(biases.size()) == n &&
                  static_cast<int64_t>(v_pools.size()) == n && static_cast<int64_t>(windows.size()) == n,
              "decoder_layers: per layer 2 norms, 4 linear layers, a bias, K and V pools and a window");
  std::vector<Weights> linears;
  size_t at = 0;
  for (const int64_t count : parts) {
    TORCH_CHECK(count > 0 && at + count <= weights.size(), "decoder_layers: parts do not match the weights");
    linears.push_back({weights.slice(at, count), formats.slice(at, count)});
    at += count;
  }
  TORCH_CHECK(at == weights.size(), "decoder_layers: parts do not match the weights");
  at::Tensor h = x;
  for (int64_t l = 0; l < n; ++l) {
    at::Tensor k = k_pools[l], v = v_pools[l];
    h = decoder_layer(h, norms[2 * l], norms[2 * l + 1], eps, linears[4 * l], biases.get(l), linears[4 * l + 1],
                      linears[4 * l + 2], linears[4 * l + 3], cos, sin, k, v, slots, block_table, seqlens,
                      query_start, num_heads, num_kv_heads, scale, windows[l], gemm_from);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("decoder_layers(Tensor x, Tensor[] norms, Tensor[] weights, int[] formats, int[] parts, Tensor?[] biases, "
        "float eps, Tensor cos, Tensor sin, Tensor(a!)[] k_pools, Tensor(b!)[] v_pools, Tensor slots, Tensor block_table, "
        "Tensor seqlens, Tensor query_start, int num_heads, int num_kv_heads, float scale, int[] windows, "
        "int gemm_from) -> Tensor");
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("decoder_layers", &decoder_layers);
}
