// A whole Llama decoder layer on GGUF blocks in one op, for the engine's packed float32 step:
//   h = x + wo(paged_attention(rope_cache_write(wqkv(rms_norm(x)))));  out = h + w2(swiglu(w13(rms_norm(h))))
// The same kernels in the same order as the PyTorch modules run them (so the same bits), called from C++:
// a Python module call and op dispatch cost ~3 us each on the CI machine, ~80 us a layer, 2.4 ms a token.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t fmt, const std::optional<at::Tensor>& bias,
                  bool swiglu, int64_t gemm_from) {
  static auto handle = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                                     const std::optional<at::Tensor>&, bool, int64_t)>("minillm::ggml_linear");
  return handle.call(x, w, fmt, x.size(-1), bias, swiglu, gemm_from);
}

at::Tensor decoder_layer(const at::Tensor& x, const at::Tensor& attention_norm, const at::Tensor& ffn_norm, double eps,
                         const at::Tensor& wqkv, int64_t fmt_qkv, const std::optional<at::Tensor>& bqkv,
                         const at::Tensor& wo, int64_t fmt_o, const at::Tensor& w13, int64_t fmt_13,
                         const at::Tensor& w2, int64_t fmt_2, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_pool, at::Tensor& v_pool, const at::Tensor& slots,
                         const at::Tensor& block_table, const at::Tensor& seqlens, const at::Tensor& query_start,
                         int64_t num_heads, int64_t num_kv_heads, double scale, int64_t window, int64_t gemm_from) {
  static auto rms_norm = op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("minillm::rms_norm");
  static auto rope_cache_write = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,
                                               at::Tensor&, const at::Tensor&, int64_t, int64_t)>("minillm::rope_cache_write");
  static auto paged_attention = op<at::Tensor(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                              double, int64_t, double)>("minillm::paged_attention");
  const at::Tensor qkv = linear(rms_norm.call(x, attention_norm, eps), wqkv, fmt_qkv, bqkv, false, gemm_from);
  const at::Tensor q = rope_cache_write.call(qkv.view({-1, qkv.size(-1)}), cos, sin, k_pool, v_pool, slots, num_heads,
                                             num_kv_heads);
  const at::Tensor attn = paged_attention.call(q, k_pool, v_pool, block_table, seqlens, query_start, scale, window, 0.);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = -1;
  const at::Tensor h = x + linear(attn.view(shape), wo, fmt_o, std::nullopt, false, gemm_from);
  const at::Tensor f = linear(rms_norm.call(h, ffn_norm, eps), w13, fmt_13, std::nullopt, true, gemm_from);
  return h + linear(f, w2, fmt_2, std::nullopt, false, gemm_from);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(minillm, m) {
  m.def("decoder_layer(Tensor x, Tensor attention_norm, Tensor ffn_norm, float eps, Tensor wqkv, int fmt_qkv, "
        "Tensor? bqkv, Tensor wo, int fmt_o, Tensor w13, int fmt_13, Tensor w2, int fmt_2, Tensor cos, Tensor sin, "
        "Tensor(a!) k_pool, Tensor(b!) v_pool, Tensor slots, Tensor block_table, Tensor seqlens, Tensor query_start, "
        "int num_heads, int num_kv_heads, float scale, int window, int gemm_from) -> Tensor");
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) { m.impl("decoder_layer", &decoder_layer); }
