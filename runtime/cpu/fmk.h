/* flashmoe-pack CPU kernels (fmk_*): fused dequantize x matmul for packed expert weights.
 *
 * Plain C11, no Python API: flashmoe_pack/backends/cpu.py calls these through ctypes.
 * Weights are in the packed record's own layout (SPEC.md): bits 2/4/8 are MLX-packed uint32
 * words with per-group scales and biases, value = q * scale + bias; bits 16 is a plain float
 * matrix. Activations and outputs are float32, row-major. Every entry point returns FMK_OK or a
 * negative FMK_E* code (never exits): see fmk_strerror.
 *
 * The instruction set is chosen at run time (fmk_isa_active): the best the CPU supports, or a
 * lower one forced by the environment variable FLASHMOE_ISA=scalar|avx2|avx512 or fmk_set_isa.
 * The decode arithmetic likewise: FLASHMOE_CPU_DOT=f32|int8 or fmk_set_dot (enum fmk_dot).
 */
#ifndef FMK_H
#define FMK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FMK_API __attribute__((visibility("default")))
#define FMK_MAX_THREADS 256

enum fmk_status {
    FMK_OK = 0,
    FMK_EINVAL = -1,  /* a bad argument: null pointer, shape, dtype, bits, group size, threads */
    FMK_ENOMEM = -2,  /* a scratch allocation failed */
    FMK_ETHREAD = -3, /* a worker thread could not be started */
    FMK_EISA = -4,    /* the requested instruction set is unknown or the CPU lacks it */
};

enum fmk_dtype { FMK_F32 = 0, FMK_F16 = 1, FMK_BF16 = 2 };

enum fmk_isa { FMK_ISA_SCALAR = 0, FMK_ISA_AVX2 = 1, FMK_ISA_AVX512 = 2, FMK_ISA_COUNT = 3 };

/* Arithmetic of the decode products (T <= 3, quantized weights). FMK_DOT_F32 (default): float32
 * FMA form, exact to float32 rounding. FMK_DOT_INT8 (opt-in, AVX-512 VNNI CPUs with the avx512
 * ISA active): activations quantized to int8 per weight group, integer dot products; faster
 * where compute bound, with the error of the activation rounding (|dx| / 2 per element). */
enum fmk_dot { FMK_DOT_F32 = 0, FMK_DOT_INT8 = 1 };

/* One weight matrix W [rows, cols] (out features x in features), as stored in a record. */
typedef struct fmk_matrix {
    const void *weight;  /* bits 2/4/8: uint32 words [rows, cols*bits/32]; bits 16: [rows, cols] wdtype */
    const void *scales;  /* bits 2/4/8: [rows, cols/group_size] in sdtype; bits 16: unused (NULL) */
    const void *biases;  /* like scales */
    int64_t rows, cols;
    int32_t bits;        /* 2, 4, 8 (quantized) or 16 (float weights) */
    int32_t group_size;  /* quantized: a multiple of 32/bits dividing cols; bits 16: ignored */
    int32_t wdtype;      /* bits 16: FMK_F32 / FMK_F16 / FMK_BF16; quantized: ignored */
    int32_t sdtype;      /* quantized: dtype of scales and biases; bits 16: ignored */
} fmk_matrix;

/* Y[T, rows] = X[T, cols] W^T. T == 1 is the decode matrix-vector product; for T > 1 each
 * unpacked weight block is reused across the tokens. threads: 1 .. FMK_MAX_THREADS. */
FMK_API int fmk_matmul(const fmk_matrix *w, const float *x, int64_t T, float *y, int threads);

/* One expert for T tokens: Y[T, H] = down(silu(gate X) * up X), X [T, H], gate/up [I, H],
 * down [H, I]. gate and up share one pass over X when they are stored alike. */
FMK_API int fmk_expert_forward(const fmk_matrix *gate, const fmk_matrix *up, const fmk_matrix *down,
                               const float *x, int64_t T, float *y, int threads);

/* Rows [r0, r1) of a quantized matrix w, dequantized (value = q * scale + bias in float32) into
 * out [r1 - r0, cols] of out_dtype (FMK_F32 / FMK_F16 / FMK_BF16, rounded to nearest even): the
 * torch twin quant.dequantize, bit for bit. */
FMK_API int fmk_dequantize(const fmk_matrix *w, int64_t r0, int64_t r1, void *out, int out_dtype, int threads);

/* Quantizes float rows src (bits 16) into dst (bits 2/4/8, group_size, sdtype and writable
 * weight / scales / biases set): per group min/max affine, scale = (max - min) / (2^bits - 1)
 * and bias = min rounded to sdtype, q = clamp(round((w - bias) / scale)). The torch twin is
 * quant.quantize(method="minmax"), bit for bit. */
FMK_API int fmk_quantize(const fmk_matrix *src, fmk_matrix *dst, int threads);

/* Reads nbytes at p with `threads` threads (a memory-bandwidth probe for benchmarks);
 * *checksum receives a sum of the 64-bit words so the reads cannot be optimised away. */
FMK_API int fmk_read_bytes(const void *p, int64_t nbytes, int threads, uint64_t *checksum);

FMK_API int fmk_isa_supported(int isa);  /* 1 if this CPU (and build) can run `isa`, else 0 */
FMK_API int fmk_isa_best(void);          /* the best supported ISA */
FMK_API int fmk_isa_active(void);        /* the ISA the kernels use now */
FMK_API int fmk_set_isa(int isa);        /* force an ISA (-1: back to FLASHMOE_ISA / best) */
FMK_API const char *fmk_isa_name(int isa);
FMK_API int fmk_dot_supported(int dot);  /* 1 if this CPU can run `dot` (enum fmk_dot) */
FMK_API int fmk_dot_active(void);        /* the decode arithmetic used now (int8: only under avx512) */
FMK_API int fmk_set_dot(int dot);        /* force it (-1: back to FLASHMOE_CPU_DOT / f32) */
FMK_API const char *fmk_strerror(int status);

#ifdef __cplusplus
}
#endif
#endif
