// Tests only (tests/test_avx512_emulated.py): the GGUF matmul's AVX-512 VNNI path built for a CPU without
// AVX-512, its intrinsics emulated by SIMDe (the build targets x86-64-v3, so that only AVX-512 is emulated),
// so that any AVX2 machine checks that path against the others. Never part of a build that runs models.

#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstdint>

// two intrinsics SIMDe 0.8.2 lacks: a lane sum, and vpmovdb (each lane's low byte)
inline int32_t minillm_reduce_add_epi32(simde__m512i v) {
  int32_t lanes[16], sum = 0;
  simde_mm512_storeu_si512(lanes, v);
  for (int32_t lane : lanes) sum += lane;
  return sum;
}
inline simde__m128i minillm_cvtepi32_epi8(simde__m512i v) {
  int32_t lanes[16];
  int8_t bytes[16];
  simde_mm512_storeu_si512(lanes, v);
  for (int i = 0; i < 16; ++i) bytes[i] = static_cast<int8_t>(lanes[i]);
  return simde_mm_loadu_si128(bytes);
}
#define _mm512_reduce_add_epi32 minillm_reduce_add_epi32
#define _mm512_cvtepi32_epi8 minillm_cvtepi32_epi8
