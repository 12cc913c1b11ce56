// GGUF (llama.cpp) block types as our kernels keep them: the file's own bytes, rows interleaved in groups.
//
// Every type is a block of 32 or 256 weights made of "units" (fp16 scales: 2 bytes; packed codes or scales:
// 4 bytes) in the file's order. A group of W rows (16; the last group: the rows left) is stored block by
// block; in a block's tile each run of units of the file's block is stored unit by unit, each unit for the
// group's W rows in turn: [unit k][row][unit bytes]. One vector load then reads a unit of 8 or 16 rows, one
// row per 32-bit lane (llama.cpp's repacked AVX layouts do the same), and a row's bytes are the file's, only
// moved: a tensor keeps its size. With W = 1 the layout is the file's own, so a table used as stored (an
// untied embedding, still in the memory map) is read by the same decoder. Q8_0 alone stores its codes
// plus 128 (code ^ 0x80), as the AVX-512 kernel's vpdpbusd wants unsigned bytes. F16 and BF16 rows are not
// interleaved: their kernel reads a row's values in order (ggml_float.h).

#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace ggml {

enum Format : int64_t {  // GGML's type ids
  F16 = 1, BF16 = 30, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
  Q5_K = 13, Q6_K = 14, IQ4_NL = 20, IQ4_XS = 23
};
constexpr int64_t GROUP = 16;  // rows interleaved together: one per lane of a 512-bit vector of int32

struct Run {  // `count` units of `size` bytes from byte `offset` of a block
  int16_t offset, size, count;
};

struct Layout {
  int64_t weights, bytes;  // per block
  int nruns;
  Run runs[4];
};

// weights per block, bytes per block, then the runs of units (see llama.cpp's ggml-common.h block_* structs);
// F16 / BF16 rows are plain values, counted in blocks of 32 (ggml_float.h)
constexpr Layout layout(int64_t fmt) {
  switch (fmt) {
    case F16: case BF16: return {32, 64, 1, {{0, 2, 32}}};
    case Q4_0: return {32, 18, 2, {{0, 2, 1}, {2, 4, 4}}};                             // d, qs
    case Q4_1: return {32, 20, 2, {{0, 2, 2}, {4, 4, 4}}};                             // d, m, qs
    case Q5_0: return {32, 22, 3, {{0, 2, 1}, {2, 4, 1}, {6, 4, 4}}};                  // d, qh, qs
    case Q5_1: return {32, 24, 3, {{0, 2, 2}, {4, 4, 1}, {8, 4, 4}}};                  // d, m, qh, qs
    case Q8_0: return {32, 34, 2, {{0, 2, 1}, {2, 4, 8}}};                             // d, qs
    case IQ4_NL: return {32, 18, 2, {{0, 2, 1}, {2, 4, 4}}};                           // d, qs
    case Q2_K: return {256, 84, 3, {{0, 4, 4}, {16, 4, 16}, {80, 2, 2}}};              // scales, qs, d, dmin
    case Q3_K: return {256, 110, 4, {{0, 4, 8}, {32, 4, 16}, {96, 4, 3}, {108, 2, 1}}};  // hmask, qs, scales, d
    case Q4_K: return {256, 144, 3, {{0, 2, 2}, {4, 4, 3}, {16, 4, 32}}};              // d, dmin, scales, qs
    case Q5_K: return {256, 176, 4, {{0, 2, 2}, {4, 4, 3}, {16, 4, 8}, {48, 4, 32}}};  // ..., qh, qs
    case Q6_K: return {256, 210, 4, {{0, 4, 32}, {128, 4, 16}, {192, 4, 4}, {208, 2, 1}}};  // ql, qh, scales, d
    case IQ4_XS: return {256, 136, 4, {{0, 2, 2}, {4, 4, 1}, {8, 4, 32}}};             // d, scales_h, scales_l, qs
    default: return {0, 0, 0, {}};
  }
}

constexpr bool is_float(int64_t fmt) { return fmt == F16 || fmt == BF16; }  // rows kept as stored, not interleaved

inline void check_format(int64_t fmt) {
  TORCH_CHECK(layout(fmt).bytes > 0, "ggml: no kernel for GGML type ", fmt);
}

// Where unit `k` of the run at block byte `offset` (units of `size` bytes) lies for `lane` in a tile of `width` rows.
inline int64_t unit_at(int64_t width, int64_t offset, int64_t size, int64_t k, int64_t lane) {
  return width * offset + (k * width + lane) * size;
}

// One row's block, gathered from its tile into the file's byte order (and Q8_0's codes back to signed).
inline void gather_block(int64_t fmt, const uint8_t* tile, int64_t width, int64_t lane, uint8_t* block) {
  const Layout l = layout(fmt);
  for (int r = 0; r < l.nruns; ++r)
    for (int k = 0; k < l.runs[r].count; ++k)
      std::memcpy(block + l.runs[r].offset + k * l.runs[r].size,
                  tile + unit_at(width, l.runs[r].offset, l.runs[r].size, k, lane), l.runs[r].size);
  if (fmt == Q8_0)
    for (int j = 2; j < 34; ++j) block[j] ^= 0x80;
}

// Copies of 2 and 4 bytes, each a single move: the repack moves every unit of the file once.
template <int SIZE>
inline void move_units(const uint8_t* src, int64_t src_step, uint8_t* dst, int64_t count) {
  for (int64_t lane = 0; lane < count; ++lane) std::memcpy(dst + lane * SIZE, src + lane * src_step, SIZE);
}

// `rows` rows of file blocks (row_bytes each) -> the interleaved layout, groups [begin, end) of them.
inline void interleave_groups(int64_t fmt, const uint8_t* src, uint8_t* dst, int64_t rows, int64_t row_bytes,
                              int64_t begin, int64_t end) {
  const Layout l = layout(fmt);
  const int64_t nb = row_bytes / l.bytes;
  if (is_float(fmt)) {  // their rows as stored
    const int64_t first = begin * GROUP, last = std::min(rows, end * GROUP);
    if (last > first) std::memcpy(dst + first * row_bytes, src + first * row_bytes, (last - first) * row_bytes);
    return;
  }
  for (int64_t g = begin; g < end; ++g) {
    const int64_t first = g * GROUP, width = std::min(GROUP, rows - first);
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* tile = dst + first * row_bytes + b * width * l.bytes;
      const uint8_t* block = src + first * row_bytes + b * l.bytes;  // lane 0's; the next lane's is a row further
      for (int r = 0; r < l.nruns; ++r)
        for (int k = 0; k < l.runs[r].count; ++k) {
          const int64_t from = l.runs[r].offset + k * l.runs[r].size;
          uint8_t* to = tile + unit_at(width, l.runs[r].offset, l.runs[r].size, k, 0);
          if (l.runs[r].size == 4) move_units<4>(block + from, row_bytes, to, width);
          else move_units<2>(block + from, row_bytes, to, width);
        }
      if (fmt == Q8_0)
        for (int64_t j = width * 2; j < width * l.bytes; ++j) tile[j] ^= 0x80;
    }
  }
}

inline float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// IQ4_NL / IQ4_XS: the 16 values a 4-bit code stands for (llama.cpp's kvalues_iq4nl, a non-uniform grid).
constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// How a type's dot product is summed (every path alike, so the same bits):
//   blocks of 32 (Q4_0 - Q8_0, IQ4_NL), activations with a scale dx per 32: per block,
//     acc = fma(float(isum), d dx, acc)   [with a min: macc = fma(m, dx sum(xq), macc)]
//   super-blocks of 256 (Q2_K - Q6_K, IQ4_XS), activations with one dx per 256 (llama.cpp's Q8_K): the
//   integer scales and mins go into exact integer sums, I = sum_k sc_k (codes . xq over 16 weights k) and
//   M = sum_k mn_k sum(xq over k), then per super-block acc = fma(float(I), d dx, acc) and, with a min,
//   acc = fma(float(M), -dmin dx, acc)
constexpr bool superblock(int64_t fmt) { return layout(fmt).weights == 256; }
constexpr bool has_min(int64_t fmt) { return fmt == Q4_1 || fmt == Q5_1 || fmt == Q2_K || fmt == Q4_K || fmt == Q5_K; }

// Q3_K's 16 six-bit scales from its 12 scale bytes: the low 4 bits from bytes 0-7 (a nibble each), the top 2
// from bytes 8-11 (four pairs each).
inline int q3k_scale(const uint8_t* s, int j) {
  const int low = (s[j % 8] >> (j < 8 ? 0 : 4)) & 15, high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return low | (high << 4);
}

// The 6-bit scale and min of sub-block j (0-7) from a Q4_K / Q5_K block's 12 scale bytes.
inline void k_scale_min(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// A super-block's integer scale and min per 16 weights: weight j = d sc[j / 16] q[j] - dmin mn[j / 16].
struct KScales {
  int32_t sc[16], mn[16];
  float d, dmin;
};

// One super-block (Q2_K - Q6_K, IQ4_XS) in the file's byte order -> its codes q (offset taken out) and scales.
inline void decode_kblock(int64_t fmt, const uint8_t* b, int32_t* q, KScales& s) {
  s.dmin = 0.f;
  for (int k = 0; k < 16; ++k) s.mn[k] = 0;
  switch (fmt) {
    case Q4_K: case Q5_K: {
      s.d = fp16(b), s.dmin = fp16(b + 2);
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (fmt == Q4_K ? 16 : 48);
      for (int c = 0; c < 4; ++c)  // 64 weights: sub-block 2c in the low nibbles, 2c + 1 in the high ones
        for (int l = 0; l < 32; ++l) {
          int lo = qs[32 * c + l] & 15, hi = qs[32 * c + l] >> 4;
          if (fmt == Q5_K) lo |= ((qh[l] >> (2 * c)) & 1) << 4, hi |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
          q[64 * c + l] = lo;
          q[64 * c + 32 + l] = hi;
        }
      for (int j = 0; j < 8; ++j) {
        int sc, mn;
        k_scale_min(b + 4, j, sc, mn);
        s.sc[2 * j] = s.sc[2 * j + 1] = sc;
        s.mn[2 * j] = s.mn[2 * j + 1] = mn;
      }
      return;
    }
    case Q2_K: case Q3_K: {  // 2-bit codes: weight 128n + 32j + l from bits 2j of qs byte 32n + l (l < 32)
      const uint8_t* qs = b + (fmt == Q2_K ? 16 : 32);
      for (int n = 0; n < 2; ++n)
        for (int j = 0; j < 4; ++j)
          for (int l = 0; l < 32; ++l) {
            int code = (qs[32 * n + l] >> (2 * j)) & 3;
            if (fmt == Q3_K) code = (code | (((b[l] >> (4 * n + j)) & 1) << 2)) - 4;  // hmask bit: the third bit
            q[128 * n + 32 * j + l] = code;
          }
      if (fmt == Q2_K) {
        s.d = fp16(b + 80), s.dmin = fp16(b + 82);
        for (int k = 0; k < 16; ++k) s.sc[k] = b[k] & 15, s.mn[k] = b[k] >> 4;
      } else {
        s.d = fp16(b + 108);
        for (int k = 0; k < 16; ++k) s.sc[k] = q3k_scale(b + 96, k) - 32;
      }
      return;
    }
    case Q6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      for (int n = 0; n < 2; ++n)  // two halves of 128 weights
        for (int l = 0; l < 32; ++l) {
          const uint8_t a = ql[64 * n + l], c = ql[64 * n + 32 + l], h = qh[32 * n + l];
          q[128 * n + l] = ((a & 15) | ((h & 3) << 4)) - 32;
          q[128 * n + 32 + l] = ((c & 15) | (((h >> 2) & 3) << 4)) - 32;
          q[128 * n + 64 + l] = ((a >> 4) | (((h >> 4) & 3) << 4)) - 32;
          q[128 * n + 96 + l] = ((c >> 4) | (((h >> 6) & 3) << 4)) - 32;
        }
      for (int k = 0; k < 16; ++k) s.sc[k] = static_cast<int8_t>(b[192 + k]);
      s.d = fp16(b + 208);
      return;
    }
    case IQ4_XS: {
      uint16_t sh;
      std::memcpy(&sh, b + 2, 2);
      for (int ib = 0; ib < 8; ++ib) {
        s.sc[2 * ib] = s.sc[2 * ib + 1] = (((b[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)) - 32;
        for (int j = 0; j < 16; ++j) {
          q[32 * ib + j] = kIq4Values[b[8 + 16 * ib + j] & 15];
          q[32 * ib + 16 + j] = kIq4Values[b[8 + 16 * ib + j] >> 4];
        }
      }
      s.d = fp16(b);
      return;
    }
    default: TORCH_CHECK(false, "ggml: GGML type ", fmt, " has no super-blocks");
  }
}

// One block in the file's byte order -> its codes q (offset taken out: weight = q d + m) and, per 16
// weights, the scale d and minimum m; returns the number of weights (dequantization and the portable path).
inline int decode_block(int64_t fmt, const uint8_t* b, int32_t* q, float* d, float* m) {
  switch (fmt) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case IQ4_NL: {
      const bool five = fmt == Q5_0 || fmt == Q5_1, with_min = fmt == Q4_1 || fmt == Q5_1;
      const uint8_t* qs = b + (with_min ? 4 : 2) + (five ? 4 : 0);
      uint32_t qh = 0;
      if (five) std::memcpy(&qh, b + (with_min ? 4 : 2), 4);
      const int offset = fmt == Q4_0 ? 8 : fmt == Q5_0 ? 16 : 0;
      for (int j = 0; j < 16; ++j) {
        int lo = qs[j] & 15, hi = qs[j] >> 4;
        if (five) lo |= ((qh >> j) & 1) << 4, hi |= ((qh >> (j + 16)) & 1) << 4;
        q[j] = fmt == IQ4_NL ? kIq4Values[lo] : lo - offset;
        q[j + 16] = fmt == IQ4_NL ? kIq4Values[hi] : hi - offset;
      }
      d[0] = d[1] = fp16(b);
      m[0] = m[1] = with_min ? fp16(b + 2) : 0.f;
      return 32;
    }
    case Q8_0:
      for (int j = 0; j < 32; ++j) q[j] = static_cast<int8_t>(b[2 + j]);
      d[0] = d[1] = fp16(b);
      m[0] = m[1] = 0.f;
      return 32;
    case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: case IQ4_XS: {
      KScales s;
      decode_kblock(fmt, b, q, s);
      for (int k = 0; k < 16; ++k) {
        d[k] = s.d * static_cast<float>(s.sc[k]);
        m[k] = has_min(fmt) ? -(s.dmin * static_cast<float>(s.mn[k])) : 0.f;
      }
      return 256;
    }
    default: TORCH_CHECK(false, "ggml: no kernel for GGML type ", fmt);
  }
  return 0;
}

}  // namespace ggml
