/* XXH64 (xxHash, 64-bit variant), written from the algorithm's public specification.
 *
 * The packed format stores an XXH64 digest (seed 0) of every expert record and resident tensor
 * (SPEC.md). The expert store checks each record it reads on its reader threads; python-xxhash
 * holds the GIL while hashing, so those checks ran one at a time and stalled the compute thread.
 * Called through ctypes (which releases the GIL), this function lets every reader thread hash in
 * parallel with compute. Portable C: one scalar loop over four independent 64-bit lanes, input
 * read as little-endian words whatever the host byte order, any alignment, any length.
 *
 * The declaration lives here rather than in fmk.h; ctypes finds the symbol by name.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fmk.h"

FMK_API int fmk_xxh64(const void *p, int64_t nbytes, uint64_t seed, uint64_t *digest);

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t load64(const unsigned char *b) {
    uint64_t v;
    memcpy(&v, b, 8); /* unaligned-safe; compiles to one load */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint64_t load32(const unsigned char *b) {
    uint32_t v;
    memcpy(&v, b, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* One lane step: fold an 8-byte input word into an accumulator. */
static inline uint64_t lane_round(uint64_t acc, uint64_t input) {
    acc += input * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

/* Merge one of the four lane accumulators into the converged value. */
static inline uint64_t merge_lane(uint64_t acc, uint64_t lane) {
    acc ^= lane_round(0, lane);
    return acc * P1 + P4;
}

int fmk_xxh64(const void *p, int64_t nbytes, uint64_t seed, uint64_t *digest) {
    if (!digest || nbytes < 0 || (!p && nbytes > 0))
        return FMK_EINVAL;
    const unsigned char *b = (const unsigned char *)p;
    const unsigned char *const end = b + nbytes;
    uint64_t acc;
    if (nbytes >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const unsigned char *const last_stripe = end - 32;
        do { /* 32-byte stripes, one 8-byte word per lane */
            v1 = lane_round(v1, load64(b));
            v2 = lane_round(v2, load64(b + 8));
            v3 = lane_round(v3, load64(b + 16));
            v4 = lane_round(v4, load64(b + 24));
            b += 32;
        } while (b <= last_stripe);
        acc = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        acc = merge_lane(acc, v1);
        acc = merge_lane(acc, v2);
        acc = merge_lane(acc, v3);
        acc = merge_lane(acc, v4);
    } else {
        acc = seed + P5;
    }
    acc += (uint64_t)nbytes;
    /* the tail (< 32 bytes): 8-byte words, then one 4-byte word, then single bytes */
    while (end - b >= 8) {
        acc ^= lane_round(0, load64(b));
        acc = rotl64(acc, 27) * P1 + P4;
        b += 8;
    }
    if (end - b >= 4) {
        acc ^= load32(b) * P1;
        acc = rotl64(acc, 23) * P2 + P3;
        b += 4;
    }
    while (b < end) {
        acc ^= (uint64_t)(*b) * P5;
        acc = rotl64(acc, 11) * P1;
        b++;
    }
    /* avalanche */
    acc ^= acc >> 33;
    acc *= P2;
    acc ^= acc >> 29;
    acc *= P3;
    acc ^= acc >> 32;
    *digest = acc;
    return FMK_OK;
}
