// Quantized matrix-vector product y[out] = W x for flashmoe-pack's group-wise affine weights.
//
// Format (flashmoe_pack/quant.py, SPEC.md): row r of W has `in_features` values in groups of
// `group_size`; value = q * scale[r, g] + bias[r, g]; q is BITS wide, packed MLX-style: element j
// of a row sits in uint32 word j / (32 / BITS) at bit offset BITS * (j % (32 / BITS)).
//
// Arithmetic (the FMA form of DESIGN.md): for every word, s1 = sum q_i x_i and s2 = sum x_i over its
// 32 / BITS values, then acc += scale * s1 + bias * s2. A word never straddles two groups (the
// launcher checks group_size % (32 / BITS) == 0), so summing these over a group's words gives
// exactly scale * sum_g(q x) + bias * sum_g(x). All math is float32.
//
// This file mirrors `qmv_twin` in flashmoe_pack/backends/mps.py line by line (the "twin:" notes);
// the twin is what the tests run on Linux. Change both together.
//
// Launch (mps.py): threads = 32 * out_features, group_size = 128. One SIMD group of 32 lanes owns
// one output row; lane l handles words l, l + 32, l + 64, ... and simd_sum adds the lanes.

#include <metal_stdlib>
using namespace metal;

// Scales and biases are stored as bfloat16, float16 or float32; read them as float.
// bfloat16 is the top half of a float32, so widen its bits instead of needing MSL 3.1's bfloat.
struct bf16 { ushort bits; };
inline float to_float(bf16 v) { return as_type<float>(uint(v.bits) << 16); }
inline float to_float(half v) { return float(v); }
inline float to_float(float v) { return v; }

// One lane's partial dot product for row `row` (twin: everything before the final sum).
template <uint BITS, typename S>
inline float qmv_lane(device const uint* w, device const S* scales, device const S* biases,
                      device const float* x, uint row, uint in_features, uint group_size, uint lane) {
  constexpr uint PER_WORD = 32 / BITS;              // values per uint32 word
  constexpr uint MASK = (1u << BITS) - 1;
  const uint words = in_features / PER_WORD;        // words per row
  const uint groups = in_features / group_size;     // groups per row
  const uint words_per_group = group_size / PER_WORD;
  w += row * words;                                 // this row's words, scales and biases
  scales += row * groups;
  biases += row * groups;
  float acc = 0.0f;
  for (uint k = lane; k < words; k += 32) {
    const uint word = w[k];
    device const float* xk = x + k * PER_WORD;      // twin: x.reshape(words, per_word)
    float s1 = 0.0f;                                // twin: s1 = (q * x).sum(-1)
    float s2 = 0.0f;                                // twin: s2 = x.sum(-1)
    for (uint i = 0; i < PER_WORD; ++i) {
      const float q = float((word >> (BITS * i)) & MASK);  // twin: (w >> shifts) & mask
      s1 += q * xk[i];
      s2 += xk[i];
    }
    const uint g = k / words_per_group;             // twin: group = arange(words) // words_per_group
    acc += to_float(scales[g]) * s1 + to_float(biases[g]) * s2;  // twin: scale * s1 + bias * s2
  }
  return acc;
}

// Whole rows: lanes of one SIMD group reduce with simd_sum (twin: part.sum(-1)).
// Scalars arrive as int64 because torch.mps passes Python ints as int64_t.
#define QMV(BITS, S, SNAME)                                                                        \
  kernel void qmv_##BITS##_##SNAME(device float* y [[buffer(0)]],                                  \
                                   device const uint* w [[buffer(1)]],                             \
                                   device const S* scales [[buffer(2)]],                           \
                                   device const S* biases [[buffer(3)]],                           \
                                   device const float* x [[buffer(4)]],                            \
                                   constant long& out_features [[buffer(5)]],                      \
                                   constant long& in_features [[buffer(6)]],                       \
                                   constant long& group_size [[buffer(7)]],                        \
                                   uint tid [[thread_position_in_grid]],                           \
                                   uint lane [[thread_index_in_simdgroup]]) {                      \
    const uint row = tid / 32;  /* SIMD width is 32 on every Apple GPU (mps.py checks it) */      \
    if (row >= uint(out_features)) return;  /* whole SIMD groups exit together */                  \
    float acc = qmv_lane<BITS, S>(w, scales, biases, x, row, uint(in_features), uint(group_size), \
                                  lane);                                                           \
    acc = simd_sum(acc);                                                                           \
    if (lane == 0) y[row] = acc;                                                                   \
  }

// Entry points: qmv_<bits>_<scale dtype>. tests/test_metal.py parses these lines.
QMV(2, bf16, bf16)
QMV(2, half, f16)
QMV(2, float, f32)
QMV(4, bf16, bf16)
QMV(4, half, f16)
QMV(4, float, f32)
QMV(8, bf16, bf16)
QMV(8, half, f16)
QMV(8, float, f32)
