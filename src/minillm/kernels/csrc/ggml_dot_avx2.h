// AVX2 paths of the types beyond Q4_0 / Q4_1 / Q8_0 (Q5_0, Q5_1, IQ4_NL, Q2_K - Q6_K, IQ4_XS), on the
// file's own bits (ggml_formats.h): each unit of a tile is read for 8 rows at once (one row per 32-bit
// lane), the codes are unpacked in registers, and the scales are decoded per row from their packed bits.
// They run on AVX-512 machines too. Same integer sums and float steps as group_portable, so the same bits.

#pragma once

#include "ggml_dot.h"

namespace ggml {

// Unit k of the run at block byte `offset` for the 8 rows of half `half` of a 16-row tile.
VEC_TARGET_AVX2 inline __m256i units8(const uint8_t* tile, int offset, int k, int half) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + unit_at(GROUP, offset, 4, k, 8 * half)));
}
VEC_TARGET_AVX2 inline __m256 fp16x8(const uint8_t* tile, int offset, int k, int half) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + unit_at(GROUP, offset, 2, k, 8 * half))));
}
VEC_TARGET_AVX2 inline __m256i bcast4(const int8_t* p) { return _mm256_set1_epi32(load_i32(p)); }
// vpmaddubsw's int16 pairs summed over several code vectors before one vpmaddwd: callers keep the sum of
// |code| x 127 x 2 over the vectors summed below 32768 (so never saturating: the same integers as int32 sums)
VEC_TARGET_AVX2 inline __m256i pairs16(__m256i u, __m256i s) { return _mm256_maddubs_epi16(u, s); }
VEC_TARGET_AVX2 inline __m256i widen16(__m256i sum16) { return _mm256_madd_epi16(sum16, _mm256_set1_epi16(1)); }
VEC_TARGET_AVX2 inline __m256i nibbles(__m256i v, bool high) {
  return _mm256_and_si256(high ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
}
// Bit `from` of every byte moved to bit `to` (all other bits cleared): one 16-bit shift and a mask (a shift of
// at most 7 never carries a bit into the kept position of the other byte of a 16-bit lane).
VEC_TARGET_AVX2 inline __m256i move_bit(__m256i v, int from, int to) {
  const __m256i shifted = from > to ? _mm256_srli_epi16(v, from - to) : _mm256_slli_epi16(v, to - from);
  return _mm256_and_si256(shifted, _mm256_set1_epi8(static_cast<char>(1 << to)));
}
VEC_TARGET_AVX2 inline __m256i lookup_iq4(__m256i codes) {  // 4-bit codes -> their signed values
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kIq4Values)));
  return _mm256_shuffle_epi8(table, codes);
}

// Q5_0 / Q5_1: for byte i of each row's 4-byte vector p, bit base + 4p + i of the row's 32-bit qh, as 0x10.
VEC_TARGET_AVX2 inline __m256i fifth_bits(__m256i qh, int p, int base) {
  const int byte = (base + 4 * p) / 8, shift = 4 * (p % 2);
  const __m256i index = _mm256_add_epi8(_mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                         0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12),
                                        _mm256_set1_epi8(static_cast<char>(byte)));
  const __m256i bit = _mm256_set1_epi32(static_cast<int>(0x08040201u << shift));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, index), bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// acc += isum x (d dx) for the activations' block ab of each token (PER32 or one half of PER16)
template <int NR>
VEC_TARGET_AVX2 inline void scale_add(const __m256i* isum, __m256 d, const XRow* x, int64_t ab, __m256* acc) {
  for (int r = 0; r < NR; ++r)
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[ab])), acc[r]);
}
template <int NR>  // macc += m x dx sum(xq) over block ab
VEC_TARGET_AVX2 inline void min_add(__m256 m, const XRow* x, int64_t ab, __m256* macc) {
  for (int r = 0; r < NR; ++r) macc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[r].sb[ab]), macc[r]);
}
VEC_TARGET_AVX2 inline __m256 negate(__m256 v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.f)); }

// Q5_0, Q5_1, IQ4_NL: blocks of 32, byte j holding weights j and j + 16
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void block32_half(const uint8_t* tile, int half, int64_t ab, const XRow* x, __m256* acc, __m256* macc) {
  constexpr bool five = FMT == Q5_0 || FMT == Q5_1, with_min = FMT == Q5_1;
  constexpr int qh_at = with_min ? 4 : 2, qs_at = qh_at + (five ? 4 : 0);
  constexpr int32_t offset = FMT == Q5_0 ? 16 : 0;
  __m256i sum[NR];
  for (int r = 0; r < NR; ++r) sum[r] = _mm256_set1_epi32(-offset * (x[r].qs[2 * ab] + x[r].qs[2 * ab + 1]));
  const __m256i qh = five ? units8(tile, qh_at, 0, half) : _mm256_setzero_si256();
  for (int p = 0; p < 4; ++p) {
    const __m256i v = units8(tile, qs_at, p, half);
    __m256i low = nibbles(v, false), high = nibbles(v, true);
    if constexpr (five) {
      low = _mm256_or_si256(low, fifth_bits(qh, p, 0));
      high = _mm256_or_si256(high, fifth_bits(qh, p, 16));
    }
    for (int r = 0; r < NR; ++r) {
      const int8_t* xq = x[r].q + ab * QK;
      if constexpr (FMT == IQ4_NL) {
        sum[r] = _mm256_add_epi32(sum[r], sdot8(lookup_iq4(low), bcast4(xq + 4 * p)));
        sum[r] = _mm256_add_epi32(sum[r], sdot8(lookup_iq4(high), bcast4(xq + 16 + 4 * p)));
      } else {
        sum[r] = _mm256_add_epi32(sum[r], udot8(low, bcast4(xq + 4 * p)));
        sum[r] = _mm256_add_epi32(sum[r], udot8(high, bcast4(xq + 16 + 4 * p)));
      }
    }
  }
  scale_add<NR>(sum, fp16x8(tile, 0, 0, half), x, ab, acc);
  if constexpr (with_min) min_add<NR>(fp16x8(tile, 0, 1, half), x, ab, macc);
}

// Q4_K / Q5_K: sub-block j's 6-bit scale and min for 8 rows, from the 12 scale bytes (3 words a row)
VEC_TARGET_AVX2 inline void k_scale_min8(const __m256i* w, int j, __m256& sc, __m256& mn) {
  const __m256i six = _mm256_set1_epi32(63), four = _mm256_set1_epi32(15), two = _mm256_set1_epi32(3);
  __m256i s, m;
  if (j < 4) {
    s = _mm256_and_si256(_mm256_srli_epi32(w[0], 8 * j), six);
    m = _mm256_and_si256(_mm256_srli_epi32(w[1], 8 * j), six);
  } else {
    const int i = 8 * (j - 4);
    s = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w[2], i), four),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w[0], i + 6), two), 4));
    m = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(w[2], i + 4), four),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(w[1], i + 6), two), 4));
  }
  sc = _mm256_cvtepi32_ps(s);
  mn = _mm256_cvtepi32_ps(m);
}

// Q4_K / Q5_K super-block: 4 chunks of 64 weights, sub-block 2c in the low nibbles, 2c + 1 in the high ones.
// int16 sums: 8 vectors of 4-bit codes (8 x 2 x 15 x 127 = 30480), or 4 of 5-bit ones (4 x 2 x 31 x 127 = 31496).
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void kquant_half(const uint8_t* tile, int half, int64_t ab0, const XRow* x, __m256* acc, __m256* macc) {
  constexpr int qs_at = FMT == Q5_K ? 48 : 16, RUN = FMT == Q5_K ? 4 : 8;
  const __m256 d = fp16x8(tile, 0, 0, half), dmin = fp16x8(tile, 0, 1, half);
  const __m256i w[3] = {units8(tile, 4, 0, half), units8(tile, 4, 1, half), units8(tile, 4, 2, half)};
  for (int c = 0; c < 4; ++c) {
    const int64_t a = ab0 + 2 * c, b = a + 1;
    __m256i lo[NR], hi[NR];
    for (int r = 0; r < NR; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int p0 = 0; p0 < 8; p0 += RUN) {
      __m256i lo16[NR], hi16[NR];
      for (int r = 0; r < NR; ++r) lo16[r] = hi16[r] = _mm256_setzero_si256();
      for (int p = p0; p < p0 + RUN; ++p) {
        const __m256i v = units8(tile, qs_at, 8 * c + p, half);
        __m256i low = nibbles(v, false), high = nibbles(v, true);
        if constexpr (FMT == Q5_K) {  // bit 2c (2c + 1) of qh byte l: the fifth bit of weight l of sub-block 2c (2c + 1)
          const __m256i qh = units8(tile, 16, p, half);
          low = _mm256_or_si256(low, move_bit(qh, 2 * c, 4));
          high = _mm256_or_si256(high, move_bit(qh, 2 * c + 1, 4));
        }
        for (int r = 0; r < NR; ++r) {
          lo16[r] = _mm256_add_epi16(lo16[r], pairs16(low, bcast4(x[r].q + a * QK + 4 * p)));
          hi16[r] = _mm256_add_epi16(hi16[r], pairs16(high, bcast4(x[r].q + b * QK + 4 * p)));
        }
      }
      for (int r = 0; r < NR; ++r) {
        lo[r] = _mm256_add_epi32(lo[r], widen16(lo16[r]));
        hi[r] = _mm256_add_epi32(hi[r], widen16(hi16[r]));
      }
    }
    __m256 sc, mn;
    k_scale_min8(w, 2 * c, sc, mn);
    scale_add<NR>(lo, _mm256_mul_ps(d, sc), x, a, acc);
    min_add<NR>(negate(_mm256_mul_ps(dmin, mn)), x, a, macc);
    k_scale_min8(w, 2 * c + 1, sc, mn);
    scale_add<NR>(hi, _mm256_mul_ps(d, sc), x, b, acc);
    min_add<NR>(negate(_mm256_mul_ps(dmin, mn)), x, b, macc);
  }
}

// Q6_K super-block: 8 blocks of 32, a scale per 16; 6-bit codes from a nibble of ql and 2 bits of qh, minus 32.
// In each half n of 128 weights, ql byte l holds weights l (low nibble) and l + 64 (high), byte l + 32 weights
// l + 32 and l + 96, and qh byte l their top bits (2 each): one pass over p reads them once for 4 blocks.
template <int NR>
VEC_TARGET_AVX2 void q6k_half(const uint8_t* tile, int half, int64_t ab0, const XRow* x, __m256* acc) {
  const __m256 d = fp16x8(tile, 208, 0, half);
  const __m256i top = _mm256_set1_epi8(0x30);
  for (int n = 0; n < 2; ++n) {
    __m256i sums[2][4][NR];  // [16-weight half][block 4n + k][token]: int32
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 4; ++k)
        for (int r = 0; r < NR; ++r) sums[h][k][r] = _mm256_setzero_si256();
      for (int p0 = 4 * h; p0 < 4 * h + 4; p0 += 2) {
        __m256i sum16[4][NR];  // int16 over 2 vectors: 2 x 2 x 63 x 127 = 32004
        for (int k = 0; k < 4; ++k)
          for (int r = 0; r < NR; ++r) sum16[k][r] = _mm256_setzero_si256();
        for (int p = p0; p < p0 + 2; ++p) {
          const __m256i a = units8(tile, 0, 16 * n + p, half), b = units8(tile, 0, 16 * n + 8 + p, half);
          const __m256i qh = units8(tile, 128, 8 * n + p, half);
          const __m256i code[4] = {
              _mm256_or_si256(nibbles(a, false), _mm256_and_si256(_mm256_slli_epi16(qh, 4), top)),
              _mm256_or_si256(nibbles(b, false), _mm256_and_si256(_mm256_slli_epi16(qh, 2), top)),
              _mm256_or_si256(nibbles(a, true), _mm256_and_si256(qh, top)),
              _mm256_or_si256(nibbles(b, true), _mm256_and_si256(_mm256_srli_epi16(qh, 2), top))};
          for (int k = 0; k < 4; ++k)
            for (int r = 0; r < NR; ++r)
              sum16[k][r] = _mm256_add_epi16(sum16[k][r], pairs16(code[k], bcast4(x[r].q + (ab0 + 4 * n + k) * QK + 4 * p)));
        }
        for (int k = 0; k < 4; ++k)
          for (int r = 0; r < NR; ++r) sums[h][k][r] = _mm256_add_epi32(sums[h][k][r], widen16(sum16[k][r]));
      }
    }
    for (int k = 0; k < 4; ++k) {
      const int jb = 4 * n + k;
      const int64_t ab = ab0 + jb;
      __m256i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) {  // the codes' offset of 32, taken out per half of 16
        lo[r] = _mm256_sub_epi32(sums[0][k][r], _mm256_set1_epi32(32 * x[r].qs[2 * ab]));
        hi[r] = _mm256_sub_epi32(sums[1][k][r], _mm256_set1_epi32(32 * x[r].qs[2 * ab + 1]));
      }
      const __m256i scales = units8(tile, 192, jb / 2, half);  // int8 scales 4u .. 4u + 3 of each row
      const int byte = 2 * (jb % 2);
      const __m256 s0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(scales, 24 - 8 * byte), 24));
      const __m256 s1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(scales, 16 - 8 * byte), 24));
      scale_add<NR>(lo, _mm256_mul_ps(d, s0), x, ab, acc);
      scale_add<NR>(hi, _mm256_mul_ps(d, s1), x, ab, acc);
    }
  }
}

// Q2_K / Q3_K super-block: 2-bit codes, weight 128n + 32j + l in bits 2j of qs byte 32n + l (Q3_K: its third
// bit in bit 4n + j of hmask byte l, and an offset of 4); a scale (Q2_K: and a min) per 16 weights. One pass
// over p reads each unit once for the 4 blocks of half n; int16 sums over 4 vectors (4 x 2 x 7 x 127 = 7112).
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void k23_half(const uint8_t* tile, int half, int64_t ab0, const XRow* x, __m256* acc, __m256* macc) {
  constexpr bool q3 = FMT == Q3_K;
  const __m256 d = fp16x8(tile, q3 ? 108 : 80, 0, half), dmin = q3 ? d : fp16x8(tile, 80, 1, half);
  const __m256i three = _mm256_set1_epi8(3);
  for (int n = 0; n < 2; ++n) {
    __m256i sums[2][4][NR];  // [16-weight half][block 4n + j][token]: int32
    for (int h = 0; h < 2; ++h) {
      __m256i sum16[4][NR];
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < NR; ++r) sum16[j][r] = _mm256_setzero_si256();
      for (int p = 4 * h; p < 4 * h + 4; ++p) {
        const __m256i qs = units8(tile, q3 ? 32 : 16, 8 * n + p, half);
        const __m256i hm = q3 ? units8(tile, 0, p, half) : qs;
        for (int j = 0; j < 4; ++j) {
          __m256i code = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), three);
          if constexpr (q3) code = _mm256_or_si256(code, move_bit(hm, 4 * n + j, 2));
          for (int r = 0; r < NR; ++r)
            sum16[j][r] = _mm256_add_epi16(sum16[j][r], pairs16(code, bcast4(x[r].q + (ab0 + 4 * n + j) * QK + 4 * p)));
        }
      }
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < NR; ++r) sums[h][j][r] = widen16(sum16[j][r]);
    }
    for (int j = 0; j < 4; ++j) {
      const int jb = 4 * n + j;
      const int64_t ab = ab0 + jb;
      __m256i isum[2][NR];
      __m256 scale[2], low[2];
      for (int h = 0; h < 2; ++h) {
        const int k = 2 * jb + h;  // the scale of these 16 weights
        for (int r = 0; r < NR; ++r)
          isum[h][r] = q3 ? _mm256_sub_epi32(sums[h][j][r], _mm256_set1_epi32(4 * x[r].qs[2 * ab + h])) : sums[h][j][r];
        if constexpr (q3) {
          const __m256i lo4 = _mm256_and_si256(_mm256_srli_epi32(units8(tile, 96, (k / 4) % 2, half), 8 * (k % 4) + (k >= 8 ? 4 : 0)),
                                               _mm256_set1_epi32(15));
          const __m256i hi2 = _mm256_and_si256(_mm256_srli_epi32(units8(tile, 96, 2, half), 8 * (k % 4) + 2 * (k / 4)),
                                               _mm256_set1_epi32(3));
          const __m256i sc = _mm256_sub_epi32(_mm256_or_si256(lo4, _mm256_slli_epi32(hi2, 4)), _mm256_set1_epi32(32));
          scale[h] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
        } else {
          const __m256i byte = _mm256_and_si256(_mm256_srli_epi32(units8(tile, 0, k / 4, half), 8 * (k % 4)),
                                                _mm256_set1_epi32(255));
          scale[h] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(byte, _mm256_set1_epi32(15))));
          low[h] = negate(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_srli_epi32(byte, 4))));
        }
      }
      scale_add<NR>(isum[0], scale[0], x, ab, acc);
      scale_add<NR>(isum[1], scale[1], x, ab, acc);
      if constexpr (!q3)
        for (int r = 0; r < NR; ++r) {
          macc[r] = _mm256_fmadd_ps(low[0], _mm256_set1_ps(x[r].s[2 * ab]), macc[r]);
          macc[r] = _mm256_fmadd_ps(low[1], _mm256_set1_ps(x[r].s[2 * ab + 1]), macc[r]);
        }
    }
  }
}

// IQ4_XS super-block: 8 blocks of 32 as IQ4_NL's, each with a 6-bit scale (minus 32) from scales_l / scales_h
template <int NR>
VEC_TARGET_AVX2 void iq4xs_half(const uint8_t* tile, int half, int64_t ab0, const XRow* x, __m256* acc) {
  const __m256 d = fp16x8(tile, 0, 0, half);
  const __m256i high_bits = _mm256_cvtepu16_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + unit_at(GROUP, 0, 2, 1, 8 * half))));
  const __m256i low_bits = units8(tile, 4, 0, half);
  for (int ib = 0; ib < 8; ++ib) {
    const int64_t ab = ab0 + ib;
    const __m256i ls = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(low_bits, 4 * ib), _mm256_set1_epi32(15)),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(high_bits, 2 * ib), _mm256_set1_epi32(3)), 4));
    __m256i sum[NR];
    for (int r = 0; r < NR; ++r) sum[r] = _mm256_setzero_si256();
    for (int p = 0; p < 4; ++p) {
      const __m256i v = units8(tile, 8, 4 * ib + p, half);
      const __m256i low = lookup_iq4(nibbles(v, false)), high = lookup_iq4(nibbles(v, true));
      for (int r = 0; r < NR; ++r) {
        const int8_t* xq = x[r].q + ab * QK;
        sum[r] = _mm256_add_epi32(sum[r], sdot8(low, bcast4(xq + 4 * p)));
        sum[r] = _mm256_add_epi32(sum[r], sdot8(high, bcast4(xq + 16 + 4 * p)));
      }
    }
    scale_add<NR>(sum, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(ls, _mm256_set1_epi32(32)))), x, ab, acc);
  }
}

// A group's 16 rows as two halves of 8, block after block.
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void group_avx2_native(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP]) {
  constexpr Layout L = layout(FMT);
  for (int half = 0; half < 2; ++half) {
    __m256 acc[NR], macc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = macc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tile = g + b * GROUP * L.bytes;
      const int64_t ab = b * (L.weights / QK);
      if constexpr (FMT == Q4_K || FMT == Q5_K) kquant_half<FMT, NR>(tile, half, ab, x, acc, macc);
      else if constexpr (FMT == Q6_K) q6k_half<NR>(tile, half, ab, x, acc);
      else if constexpr (FMT == Q2_K || FMT == Q3_K) k23_half<FMT, NR>(tile, half, ab, x, acc, macc);
      else if constexpr (FMT == IQ4_XS) iq4xs_half<NR>(tile, half, ab, x, acc);
      else block32_half<FMT, NR>(tile, half, ab, x, acc, macc);
    }
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r] + 8 * half, _mm256_add_ps(acc[r], macc[r]));
  }
}

}  // namespace ggml
