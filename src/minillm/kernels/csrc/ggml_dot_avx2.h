// AVX2 paths of every quantized type, on the file's own bits (ggml_formats.h): each unit of a tile is read for
// 8 rows at once (one row per 32-bit lane; the blocks of 32, Q4_K, Q5_K and Q6_K read both halves of a tile
// together), the codes are unpacked in registers, and the scales are decoded per row from their packed bits.
// AVX-512 machines run them too, but for Q4_0, Q4_1 and Q8_0 (ggml_dot_vnni.h).
// Same integer sums and float steps as group_portable, so the same bits.

#pragma once

#include <utility>

#include "ggml_dot.h"

namespace ggml {

// The kernels' loops are short and their trip counts fixed: unrolled, their arrays of sums stay in registers.
// The outermost loop of a super-block (`steps`) is unrolled too for one or two tokens; for more, its
// unrolled code would spill.
#define UNROLL _Pragma("GCC unroll 16")
template <class F, int... I>
VEC_TARGET_AVX2 inline void unrolled(F& f, std::integer_sequence<int, I...>) { (f(I), ...); }
template <int N, int NR, class F>
VEC_TARGET_AVX2 inline void steps(F&& f) {
  if constexpr (NR <= 2) unrolled(f, std::make_integer_sequence<int, N>{});
  else for (int i = 0; i < N; ++i) f(i);
}

// Unit k of the run at block byte `offset` for the 8 rows of half `half` of a 16-row tile.
VEC_TARGET_AVX2 inline __m256i units8(const uint8_t* tile, int offset, int k, int half) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + unit_at(GROUP, offset, 4, k, 8 * half)));
}
VEC_TARGET_AVX2 inline __m256 fp16x8(const uint8_t* tile, int offset, int k, int half) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + unit_at(GROUP, offset, 2, k, 8 * half))));
}
VEC_TARGET_AVX2 inline __m256i bcast4(const int8_t* p) { return _mm256_set1_epi32(load_i32(p)); }
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

// ---------------------------------------------------------------- blocks of 32: whole tiles
// Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL (byte j of a block: weights j and j + 16) and Q8_0 take the 16 rows of a tile
// at once, as the K-quants do: a broadcast of 4 activation codes serves both vectors of 8 rows.

// The codes of unit p (0-3) of a tile for the 8 rows of half h: weights 16 q + 4p + i of each row (q = 0: the
// low nibbles, 1: the high ones); unsigned for the 4- and 5-bit types, signed for IQ4_NL and Q8_0.
template <int64_t FMT>
VEC_TARGET_AVX2 inline __m256i block32_codes(const uint8_t* tile, int p, int q, int h) {
  if constexpr (FMT == Q8_0) {  // stored plus 128
    return _mm256_xor_si256(units8(tile, 2, p + 4 * q, h), _mm256_set1_epi8(static_cast<char>(0x80)));
  } else {
    constexpr bool five = FMT == Q5_0 || FMT == Q5_1;
    constexpr int qh_at = FMT == Q5_1 ? 4 : 2, qs_at = FMT == Q4_1 ? 4 : FMT == Q5_0 ? 6 : FMT == Q5_1 ? 8 : 2;
    __m256i code = nibbles(units8(tile, qs_at, p, h), q);
    if constexpr (five) code = _mm256_or_si256(code, fifth_bits(units8(tile, qh_at, 0, h), p, 16 * q));
    if constexpr (FMT == IQ4_NL) code = lookup_iq4(code);
    return code;
  }
}

// Two sums' updates kept in order by an empty asm: GCC would otherwise reassociate the chains of additions
// into trees whose operands spill (the whole-tile kernels below).
#define CHAIN(a, b) asm("" : "+x"(a), "+x"(b))

// A group's 16 rows against NR tokens, block after block. Unsigned codes: vpmaddubsw's pairs summed in int16
// over a run of 8 vectors of 4-bit codes (8 x 2 x 15 x 127 = 30480) or 4 of 5-bit ones, then one vpmaddwd;
// signed ones as |code| against the activations with the code's sign, each vector widened (2 x 128 x 127).
// The mins (Q4_1, Q5_1): from 3 tokens on, summed after the codes in a loop of their own (the same order).
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void block32_tiles(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP], const uint8_t* ahead) {
  constexpr int64_t TILE = GROUP * layout(FMT).bytes;
  constexpr bool is_signed = FMT == Q8_0 || FMT == IQ4_NL;
  constexpr int RUN = FMT == Q4_0 || FMT == Q4_1 ? 4 : 2;  // units per int16 sum (and per prefetch part)
  constexpr int32_t offset = FMT == Q4_0 ? 8 : FMT == Q5_0 ? 16 : 0;
  constexpr bool with_min = FMT == Q4_1 || FMT == Q5_1;
  __m256 acc[NR][2], macc[2][NR];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = macc[0][r] = macc[1][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* tile = g + b * TILE;
    const Ahead next{ahead, b};
    __m256i isum[NR][2];
    if constexpr (is_signed)
      for (int r = 0; r < NR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
    UNROLL for (int p0 = 0; p0 < 4; p0 += RUN) {
      next.share<2 * TILE, 4 / RUN>(p0 / RUN);
      __m256i s16[NR][2];
      for (int r = 0; r < NR; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
      UNROLL for (int p = p0; p < p0 + RUN; ++p) {
        UNROLL for (int q = 0; q < 2; ++q) {
          const __m256i code[2] = {block32_codes<FMT>(tile, p, q, 0), block32_codes<FMT>(tile, p, q, 1)};
          for (int r = 0; r < NR; ++r) {
            const __m256i a = bcast4(x[r].q + b * QK + 16 * q + 4 * p);
            if constexpr (is_signed) {
              isum[r][0] = _mm256_add_epi32(isum[r][0], sdot8(code[0], a));
              isum[r][1] = _mm256_add_epi32(isum[r][1], sdot8(code[1], a));
              CHAIN(isum[r][0], isum[r][1]);
            } else {
              s16[r][0] = _mm256_add_epi16(s16[r][0], pairs16(code[0], a));
              s16[r][1] = _mm256_add_epi16(s16[r][1], pairs16(code[1], a));
              CHAIN(s16[r][0], s16[r][1]);
            }
          }
        }
      }
      if constexpr (!is_signed)
        for (int r = 0; r < NR; ++r)
          UNROLL for (int h = 0; h < 2; ++h)  // the first run's sums start from the codes' offset x sum(xq)
            isum[r][h] = _mm256_add_epi32(p0 ? isum[r][h] : _mm256_set1_epi32(-offset * x[r].qb[b]), widen16(s16[r][h]));
    }
    UNROLL for (int h = 0; h < 2; ++h) {
      const __m256 d = fp16x8(tile, 0, 0, h);
      for (int r = 0; r < NR; ++r)
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r][h]), _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), acc[r][h]);
      if constexpr (with_min && NR <= 2) min_add<NR>(fp16x8(tile, 0, 1, h), x, b, macc[h]);
    }
  }
  UNROLL for (int h = 0; h < 2; ++h) {
    if constexpr (with_min && NR > 2)  // after the codes: the registers held their sums
      for (int64_t b = 0; b < nb; ++b) min_add<NR>(fp16x8(g + b * TILE, 0, 1, h), x, b, macc[h]);
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r] + 8 * h, _mm256_add_ps(acc[r][h], macc[h][r]));
  }
}

// ---------------------------------------------------------------- super-blocks: integer scales
// vpmaddubsw leaves int16 pairs of products; vpmaddwd by a per-row int16 scale (or min) in both halves of a
// row's lane sums them times that scale into int32: the scales cost no extra instruction.
VEC_TARGET_AVX2 inline __m256i pair16(__m256i v) {  // int32 lanes of small signed values -> v in both int16 halves
  return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(v, 16));
}
// Bytes i0, i0, i1, i1 of each row's 32-bit lane: as int16 lanes, (b << 8 | b) of bytes i0 and i1, from
// which an arithmetic shift by 8 gives the signed bytes, a mask the low nibbles, a shift by 4 the high ones.
VEC_TARGET_AVX2 inline __m256i spread(__m256i w, int i0, int i1) {
  const __m256i lane = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                        0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
  const __m256i index = _mm256_add_epi8(lane, _mm256_set1_epi32(static_cast<int>(0x01010000u * i1 + 0x0101u * i0)));
  return _mm256_shuffle_epi8(w, index);
}
VEC_TARGET_AVX2 inline __m256i low_nibble16(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi16(15)); }
VEC_TARGET_AVX2 inline __m256i high_nibble16(__m256i v) { return low_nibble16(_mm256_srli_epi16(v, 4)); }
VEC_TARGET_AVX2 inline __m256i bcast_pair(const int16_t* p) { return _mm256_set1_epi32(load_i32(p)); }

// Q4_K / Q5_K: the 6-bit scales (or mins) of 8 rows from the 12 scale bytes (3 words a row), as bytes: those
// of sub-blocks 0-3 in the lanes of v[0], 4-7 in v[1] (five operations for eight values a row).
VEC_TARGET_AVX2 inline void k_sixbit_bytes(const __m256i* w, bool min, __m256i* v) {
  const __m256i low6 = _mm256_set1_epi8(63), low4 = _mm256_set1_epi8(15), top2 = _mm256_set1_epi8(0x30);
  const __m256i low = min ? _mm256_srli_epi16(w[2], 4) : w[2];  // bits 0-3 of 4-7, in either nibble of w[2]
  v[0] = _mm256_and_si256(w[min ? 1 : 0], low6);
  v[1] = _mm256_or_si256(_mm256_and_si256(low, low4), _mm256_and_si256(_mm256_srli_epi16(w[min ? 1 : 0], 2), top2));
}
// vpshufb indices that put bytes of each 32-bit lane into its two int16 halves (the other byte zero)
alignas(32) inline const auto kBytePairs = [] {  // [j]: byte j % 4 of each lane into both its int16 halves
  struct { uint8_t v[8][32]; } t{};
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 32; ++i) t.v[j][i] = i % 2 ? 0x80 : static_cast<uint8_t>(i / 4 * 4 + j % 4);
  return t;
}();
alignas(32) inline const auto kMinPairs = [] {  // [e]: bytes 2e, 2e + 1 of each lane as its int16 halves
  struct { uint8_t v[2][32]; } t{};
  for (int e = 0; e < 2; ++e)
    for (int i = 0; i < 32; ++i) t.v[e][i] = i % 2 ? 0x80 : static_cast<uint8_t>(i / 4 * 4 + 2 * e + i % 4 / 2);
  return t;
}();
VEC_TARGET_AVX2 inline __m256i table_shuffle(__m256i v, const uint8_t* index) {
  return _mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(index)));
}
// Signed bytes as int16 halves: shuffled in offset by 128 (unsigned, high byte zero), then the offset taken off.
VEC_TARGET_AVX2 inline __m256i signed_pairs16(__m256i v, const uint8_t* index) {
  return _mm256_sub_epi16(table_shuffle(_mm256_xor_si256(v, _mm256_set1_epi8(-128)), index), _mm256_set1_epi16(128));
}

// ---------------------------------------------------------------- Q4_K, Q5_K and Q6_K: whole tiles
// The types of Q4_K_M and Q5_K_M files take the 16 rows of a tile at once: each broadcast of the activations
// then serves two vectors of codes (8 rows each), and the loops over a super-block stay rolled, so that their
// sums stay in registers; the int16 sums are chained (CHAIN). One thread, 4096 x 2048, Zen 2: Q4_K 29 -> 49 G
// weight-tokens/s at one token, 57 -> 71 at four, 63 -> 77 at 64; Q5_K 21 -> 28 at one token, 51 -> 58 at 64;
// Q6_K 20 -> 25 at one.

// Q4_K / Q5_K's scales and mins of both halves, as bytes (k_sixbit_bytes).
VEC_TARGET_AVX2 inline void kquant_scales(const uint8_t* tile, __m256i (*sc)[2], __m256i (*mn)[2]) {
  for (int h = 0; h < 2; ++h) {
    const __m256i w[3] = {units8(tile, 4, 0, h), units8(tile, 4, 1, h), units8(tile, 4, 2, h)};
    k_sixbit_bytes(w, false, sc[h]);
    k_sixbit_bytes(w, true, mn[h]);
  }
}
// acc[r][h] += d dx isum - dmin dx (the mins against the sums of codes per 32), per token r and half h
template <int NR>
VEC_TARGET_AVX2 inline void kquant_finish(const uint8_t* tile, int64_t ab0, const XRow* x, __m256i (*isum)[2],
                                       __m256i (*mn)[2], __m256 (*acc)[2]) {
  for (int h = 0; h < 2; ++h) {
    __m256i is[NR], ms[NR];
    __m256 a[NR];
    for (int r = 0; r < NR; ++r) is[r] = isum[r][h], ms[r] = _mm256_setzero_si256(), a[r] = acc[r][h];
    for (int c = 0; c < 4; ++c) {
      const __m256i mins = table_shuffle(mn[h][c / 2], kMinPairs.v[c % 2]);  // sub-blocks 2c, 2c + 1
      for (int r = 0; r < NR; ++r) ms[r] = _mm256_add_epi32(ms[r], _mm256_madd_epi16(mins, bcast_pair(x[r].qb + ab0 + 2 * c)));
    }
    scale_add<NR>(is, fp16x8(tile, 0, 0, h), x, ab0, a);
    scale_add<NR>(ms, negate(fp16x8(tile, 0, 1, h)), x, ab0, a);
    for (int r = 0; r < NR; ++r) acc[r][h] = a[r];
  }
}

// Q5_K's fifth bit of sub-block j (bit j of each qh byte) as 0x10, by a compare: no shift (Zen 2 runs one a cycle)
alignas(32) inline const auto kBitJ = [] {  // [j]: 1 << j in every byte
  struct { uint8_t v[8][32]; } t{};
  for (int j = 0; j < 8; ++j)
    for (int i = 0; i < 32; ++i) t.v[j][i] = static_cast<uint8_t>(1 << j);
  return t;
}();
VEC_TARGET_AVX2 inline __m256i fifth_bit(__m256i qh, int j) {
  const __m256i bit = _mm256_load_si256(reinterpret_cast<const __m256i*>(kBitJ.v[j]));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(0x10));
}

// Q4_K / Q5_K, one token: 4 chunks of 64 weights, sub-block 2c in the low nibbles, 2c + 1 in the high ones,
// both in one pass; int16 sums over 8 vectors of 4-bit codes (8 x 2 x 15 x 127 = 30480) or 4 of 5-bit ones.
template <int64_t FMT>
VEC_TARGET_AVX2 inline void kquant_tile_1(const uint8_t* tile, int64_t ab0, const XRow* x, __m256 (*acc)[2], Ahead ahead) {
  constexpr bool five = FMT == Q5_K;
  constexpr int RUN = five ? 4 : 8;
  __m256i sc[2][2], mn[2][2], isum[1][2] = {{_mm256_setzero_si256(), _mm256_setzero_si256()}};
  kquant_scales(tile, sc, mn);
  const int8_t* xq = x[0].q + ab0 * QK;
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int c = 0; c < 4; ++c) {
    ahead.share<2 * GROUP * layout(FMT).bytes, 4>(c);
    const uint8_t* q = tile + unit_at(GROUP, five ? 48 : 16, 4, 8 * c, 0);
    UNROLL for (int p0 = 0; p0 < 8; p0 += RUN) {
      __m256i lo16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, hi16[2] = {lo16[0], lo16[0]};
      UNROLL for (int p = p0; p < p0 + RUN; ++p) {
        const __m256i a = bcast4(xq + 64 * c + 4 * p), b = bcast4(xq + 64 * c + 32 + 4 * p);
        UNROLL for (int h = 0; h < 2; ++h) {
          const __m256i v = units8(q, 0, p, h);
          __m256i lo = _mm256_and_si256(v, m4), hi = nibbles(v, true);
          if constexpr (five) {
            const __m256i qh = units8(tile, 16, p, h);
            lo = _mm256_or_si256(lo, fifth_bit(qh, 2 * c));
            hi = _mm256_or_si256(hi, fifth_bit(qh, 2 * c + 1));
          }
          lo16[h] = _mm256_add_epi16(lo16[h], pairs16(lo, a));
          hi16[h] = _mm256_add_epi16(hi16[h], pairs16(hi, b));
          CHAIN(lo16[h], hi16[h]);
        }
      }
      for (int h = 0; h < 2; ++h) {
        isum[0][h] = _mm256_add_epi32(isum[0][h], _mm256_madd_epi16(lo16[h], table_shuffle(sc[h][c / 2], kBytePairs.v[2 * c])));
        isum[0][h] = _mm256_add_epi32(isum[0][h], _mm256_madd_epi16(hi16[h], table_shuffle(sc[h][c / 2], kBytePairs.v[2 * c + 1])));
      }
    }
  }
  kquant_finish<1>(tile, ab0, x, isum, mn, acc);
}

// Q4_K / Q5_K, several tokens: a sub-block per pass (the low nibbles, then the high ones, each pass written
// out, so the shift is an immediate or none), as the sums of both would no longer fit the registers.
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 inline void kquant_tile(const uint8_t* tile, int64_t ab0, const XRow* x, __m256 (*acc)[2], Ahead ahead) {
  constexpr bool five = FMT == Q5_K;
  constexpr int RUN = five ? 4 : 8;
  __m256i sc[2][2], mn[2][2], isum[NR][2];
  kquant_scales(tile, sc, mn);
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int r = 0; r < NR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
  for (int c = 0; c < 4; ++c) UNROLL for (int high = 0; high < 2; ++high) {
    const int j = 2 * c + high;
    if (!high) ahead.share<2 * GROUP * layout(FMT).bytes, 4>(c);
    const uint8_t* q = tile + unit_at(GROUP, five ? 48 : 16, 4, 8 * c, 0);
    UNROLL for (int p0 = 0; p0 < 8; p0 += RUN) {
      __m256i s16[NR][2];
      for (int r = 0; r < NR; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
      UNROLL for (int p = p0; p < p0 + RUN; ++p) {
        __m256i v[2];
        UNROLL for (int h = 0; h < 2; ++h) {
          v[h] = nibbles(units8(q, 0, p, h), high);
          if constexpr (five) v[h] = _mm256_or_si256(v[h], fifth_bit(units8(tile, 16, p, h), j));
        }
        for (int r = 0; r < NR; ++r) {
          const __m256i a = bcast4(x[r].q + (ab0 + j) * QK + 4 * p);
          s16[r][0] = _mm256_add_epi16(s16[r][0], pairs16(v[0], a));
          s16[r][1] = _mm256_add_epi16(s16[r][1], pairs16(v[1], a));
          CHAIN(s16[r][0], s16[r][1]);
        }
      }
      for (int h = 0; h < 2; ++h) {
        const __m256i scale = table_shuffle(sc[h][j / 4], kBytePairs.v[j]);
        for (int r = 0; r < NR; ++r) isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(s16[r][h], scale));
      }
    }
  }
  kquant_finish<NR>(tile, ab0, x, isum, mn, acc);
}

// Q6_K: 8 blocks of 32, a signed scale per 16; 6-bit codes from a nibble of ql and 2 bits of qh, minus 32. In
// each half n of 128 weights, ql byte l holds weights l (low nibble) and l + 64 (high), byte l + 32 weights
// l + 32 and l + 96, and qh byte l their top bits (2 each). One pass per 16 weights of a block (one scale);
// int16 sums over 2 vectors (2 x 2 x 63 x 127 = 32004). The codes go in unsigned; their offset of 32 comes out
// as 32 sum_k sc_k sum(xq over the 16 weights k).
template <int NR>
VEC_TARGET_AVX2 inline void q6k_tile(const uint8_t* tile, int64_t ab0, const XRow* x, __m256 (*acc)[2], Ahead ahead) {
  const __m256i m4 = _mm256_set1_epi8(15), top = _mm256_set1_epi8(0x30);
  __m256i isum[NR][2];
  for (int r = 0; r < NR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {  // half n = i / 2 of the weights, 16-weight half h = i % 2 of its blocks
    const int n = i / 2, h = i % 2;
    const uint8_t* scales = tile + unit_at(GROUP, 192, 4, 2 * n, 0);
    UNROLL for (int k = 0; k < 4; ++k) {  // block 4n + k: nibble k / 2 of ql vector k % 2, qh bits 2k, 2k + 1
      ahead.share<2 * GROUP * layout(Q6_K).bytes, 16>(4 * i + k);
      const uint8_t* ql = tile + unit_at(GROUP, 0, 4, 16 * n + 8 * (k % 2) + 4 * h, 0);
      const uint8_t* qh = tile + unit_at(GROUP, 128, 4, 8 * n + 4 * h, 0);
      asm("" : "+r"(qh));  // opaque: else GCC keeps each block's qh units for the next, and spills
      UNROLL for (int p0 = 0; p0 < 4; p0 += 2) {
        __m256i s16[NR][2];
        for (int r = 0; r < NR; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
        UNROLL for (int p = p0; p < p0 + 2; ++p) {
          __m256i code[2];
          UNROLL for (int hh = 0; hh < 2; ++hh) {
            const __m256i u = units8(qh, 0, p, hh);
            const __m256i high = k < 2 ? _mm256_slli_epi16(u, 4 - 2 * k) : k == 2 ? u : _mm256_srli_epi16(u, 2);
            code[hh] = _mm256_or_si256(nibbles(units8(ql, 0, p, hh), k / 2), _mm256_and_si256(high, top));
          }
          for (int r = 0; r < NR; ++r) {
            const __m256i a = bcast4(x[r].q + (ab0 + 4 * n + k) * QK + 16 * h + 4 * p);
            s16[r][0] = _mm256_add_epi16(s16[r][0], pairs16(code[0], a));
            s16[r][1] = _mm256_add_epi16(s16[r][1], pairs16(code[1], a));
            CHAIN(s16[r][0], s16[r][1]);
          }
        }
        UNROLL for (int hh = 0; hh < 2; ++hh) {  // scale 8n + 2k + h: byte 2 (k % 2) + h of unit 2n + k / 2
          const __m256i scale = signed_pairs16(units8(scales, 0, k / 2, hh), kBytePairs.v[2 * (k % 2) + h]);
          for (int r = 0; r < NR; ++r) isum[r][hh] = _mm256_add_epi32(isum[r][hh], _mm256_madd_epi16(s16[r][hh], scale));
        }
      }
    }
  }
  for (int hh = 0; hh < 2; ++hh) {  // the offset: the scales in pairs against their sums of 16 codes
    __m256i is[NR];
    __m256 a[NR];
    for (int r = 0; r < NR; ++r) is[r] = isum[r][hh], a[r] = acc[r][hh];
    for (int u = 0; u < 4; ++u) {
      const __m256i unit = units8(tile, 192, u, hh);
      const __m256i s01 = signed_pairs16(unit, kMinPairs.v[0]), s23 = signed_pairs16(unit, kMinPairs.v[1]);
      for (int r = 0; r < NR; ++r) {
        const int16_t* qs = x[r].qs + 2 * ab0 + 4 * u;
        const __m256i offset = _mm256_add_epi32(_mm256_madd_epi16(s01, bcast_pair(qs)), _mm256_madd_epi16(s23, bcast_pair(qs + 2)));
        is[r] = _mm256_sub_epi32(is[r], _mm256_slli_epi32(offset, 5));
      }
    }
    scale_add<NR>(is, fp16x8(tile, 208, 0, hh), x, ab0, a);
    for (int r = 0; r < NR; ++r) acc[r][hh] = a[r];
  }
}
#undef CHAIN

// Q2_K / Q3_K super-block: 2-bit codes, weight 128n + 32j + l in bits 2j of qs byte 32n + l (Q3_K: its third
// bit in bit 4n + j of hmask byte l, and an offset of 4); a scale (Q2_K: and a min) per 16 weights. One pass
// over p reads each unit once for the 4 blocks of half n; int16 sums over 4 vectors (4 x 2 x 7 x 127 = 7112),
// one of each pair less Q3_K's offset, 4 x sum(xq) (at most 4 x 16 x 127 = 8128): still within int16.
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void k23_half(const uint8_t* tile, int half, int64_t ab0, const XRow* x, __m256* acc) {
  constexpr bool q3 = FMT == Q3_K;
  constexpr int PASS = NR >= 3 ? 1 : 4;  // blocks per pass over the codes: from 3 tokens on their sums spilled
  const __m256i three = _mm256_set1_epi8(3);
  __m256i isum[NR];
  for (int r = 0; r < NR; ++r) isum[r] = _mm256_setzero_si256();
  steps<2, NR>([&](int n) VEC_TARGET_AVX2 {
    UNROLL for (int h = 0; h < 2; ++h) {
      UNROLL for (int j0 = 0; j0 < 4; j0 += PASS) {  // blocks 4n + j0 .. of this pass
        __m256i sum16[PASS][NR];
        UNROLL for (int i = 0; i < PASS; ++i)
          for (int r = 0; r < NR; ++r) sum16[i][r] = _mm256_setzero_si256();
        UNROLL for (int p = 4 * h; p < 4 * h + 4; ++p) {
          const __m256i qs = units8(tile, q3 ? 32 : 16, 8 * n + p, half);
          const __m256i hm = q3 ? units8(tile, 0, p, half) : qs;
          UNROLL for (int i = 0; i < PASS; ++i) {
            const int j = j0 + i;
            __m256i code = _mm256_and_si256(_mm256_srli_epi16(qs, 2 * j), three);
            if constexpr (q3) code = _mm256_or_si256(code, move_bit(hm, 4 * n + j, 2));
            for (int r = 0; r < NR; ++r) {
              const __m256i xq = bcast4(x[r].q + (ab0 + 4 * n + j) * QK + 4 * p);
              sum16[i][r] = _mm256_add_epi16(sum16[i][r], pairs16(code, xq));
            }
          }
        }
        UNROLL for (int i = 0; i < PASS; ++i) {
          const int j = j0 + i, k = 8 * n + 2 * j + h;  // the scale of these 16 weights
          __m256i scale;
          if constexpr (q3) {
            const __m256i lo = units8(tile, 96, (k / 4) % 2, half), hi = units8(tile, 96, 2, half);
            const __m256i lo4 = _mm256_and_si256(_mm256_srli_epi32(lo, 8 * (k % 4) + (k >= 8 ? 4 : 0)), _mm256_set1_epi32(15));
            const __m256i hi2 = _mm256_and_si256(_mm256_srli_epi32(hi, 8 * (k % 4) + 2 * (k / 4)), _mm256_set1_epi32(3));
            scale = pair16(_mm256_sub_epi32(_mm256_or_si256(lo4, _mm256_slli_epi32(hi2, 4)), _mm256_set1_epi32(32)));
            for (int r = 0; r < NR; ++r)  // from the low int16 of each pair only: vpmaddwd adds the two
              sum16[i][r] = _mm256_sub_epi16(sum16[i][r],
                                             _mm256_set1_epi32(static_cast<uint16_t>(4 * x[r].qs[2 * ab0 + k])));
          } else {
            scale = low_nibble16(spread(units8(tile, 0, k / 4, half), k % 4, k % 4));
          }
          for (int r = 0; r < NR; ++r) isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(sum16[i][r], scale));
        }
      }
    }
  });
  scale_add<NR>(isum, fp16x8(tile, q3 ? 108 : 80, 0, half), x, ab0, acc);
  if constexpr (!q3) {  // the mins (high nibbles), a pair of scales at a time against their sums of codes
    __m256i msum[NR];
    for (int r = 0; r < NR; ++r) msum[r] = _mm256_setzero_si256();
    for (int u = 0; u < 4; ++u) {
      const __m256i w = units8(tile, 0, u, half);
      const __m256i m01 = high_nibble16(spread(w, 0, 1)), m23 = high_nibble16(spread(w, 2, 3));
      for (int r = 0; r < NR; ++r) {
        const int16_t* qs = x[r].qs + 2 * ab0 + 4 * u;
        msum[r] = _mm256_add_epi32(msum[r], _mm256_add_epi32(_mm256_madd_epi16(m01, bcast_pair(qs)),
                                                             _mm256_madd_epi16(m23, bcast_pair(qs + 2))));
      }
    }
    scale_add<NR>(msum, negate(fp16x8(tile, 80, 1, half)), x, ab0, acc);
  }
}

// IQ4_XS super-block: 8 blocks of 32 as IQ4_NL's, each with a 6-bit scale (minus 32) from scales_l / scales_h.
// Signed values: |value| x sign(value) x (the activation) through vpmaddubsw, then vpmaddwd by the scale.
template <int NR>
VEC_TARGET_AVX2 void iq4xs_half(const uint8_t* tile, int half, int64_t ab0, const XRow* x, __m256* acc) {
  const __m256i high_bits = _mm256_cvtepu16_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + unit_at(GROUP, 0, 2, 1, 8 * half))));
  const __m256i low_bits = units8(tile, 4, 0, half);
  __m256i isum[NR];
  for (int r = 0; r < NR; ++r) isum[r] = _mm256_setzero_si256();
  for (int ib = 0; ib < 8; ++ib) {
    const int64_t ab = ab0 + ib;
    const __m256i ls = _mm256_or_si256(
        _mm256_and_si256(_mm256_srli_epi32(low_bits, 4 * ib), _mm256_set1_epi32(15)),
        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(high_bits, 2 * ib), _mm256_set1_epi32(3)), 4));
    const __m256i scale = pair16(_mm256_sub_epi32(ls, _mm256_set1_epi32(32)));
    UNROLL for (int p = 0; p < 4; ++p) {
      const __m256i v = units8(tile, 8, 4 * ib + p, half);
      const __m256i low = lookup_iq4(nibbles(v, false)), high = lookup_iq4(nibbles(v, true));
      const __m256i low_abs = _mm256_sign_epi8(low, low), high_abs = _mm256_sign_epi8(high, high);
      for (int r = 0; r < NR; ++r) {
        const int8_t* xq = x[r].q + ab * QK;
        const __m256i a = pairs16(low_abs, _mm256_sign_epi8(bcast4(xq + 4 * p), low));
        const __m256i b = pairs16(high_abs, _mm256_sign_epi8(bcast4(xq + 16 + 4 * p), high));
        isum[r] = _mm256_add_epi32(isum[r], _mm256_add_epi32(_mm256_madd_epi16(a, scale), _mm256_madd_epi16(b, scale)));
      }
    }
  }
  scale_add<NR>(isum, fp16x8(tile, 0, 0, half), x, ab0, acc);
}

// A group's 16 rows, block after block: as whole tiles (blocks of 32, Q4_K, Q5_K, Q6_K) or two halves of 8.
template <int64_t FMT, int NR>
VEC_TARGET_AVX2 void group_avx2(const uint8_t* g, int64_t nb, const XRow* x, float (*out)[GROUP], const uint8_t* ahead) {
  constexpr Layout L = layout(FMT);
  if constexpr (!superblock(FMT)) {
    block32_tiles<FMT, NR>(g, nb, x, out, ahead);
  } else if constexpr (FMT == Q4_K || FMT == Q5_K || FMT == Q6_K) {
    __m256 acc[NR][2];
    for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* tile = g + b * GROUP * L.bytes;
      const int64_t ab = b * (L.weights / QK);
      const Ahead next{ahead, b};
      if constexpr (FMT == Q6_K) q6k_tile<NR>(tile, ab, x, acc, next);
      else if constexpr (NR == 1) kquant_tile_1<FMT>(tile, ab, x, acc, next);
      else kquant_tile<FMT, NR>(tile, ab, x, acc, next);
    }
    for (int r = 0; r < NR; ++r)
      for (int half = 0; half < 2; ++half) _mm256_storeu_ps(out[r] + 8 * half, acc[r][half]);
  } else {
    for (int half = 0; half < 2; ++half) {
      __m256 acc[NR];
      for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* tile = g + b * GROUP * L.bytes;
        if (ahead) prefetch_share<GROUP * L.bytes>(ahead, half * nb + b);
        const int64_t ab = b * (L.weights / QK);
        if constexpr (FMT == Q2_K || FMT == Q3_K) k23_half<FMT, NR>(tile, half, ab, x, acc);
        else iq4xs_half<NR>(tile, half, ab, x, acc);
      }
      for (int r = 0; r < NR; ++r) _mm256_storeu_ps(out[r] + 8 * half, acc[r]);
    }
  }
}

}  // namespace ggml
