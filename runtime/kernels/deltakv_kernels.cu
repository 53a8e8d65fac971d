/* deltakv GPU kernels: encode and decode of the Delta-KV codecs (f16, q8_0, q4_0, delta-q4_0, dkv-q4).
 *
 * One source for nvcc (CUDA), hipcc (AMD) and a CPU emulator (DKV_EMU); see deltakv_gpu_compat.h.
 * The C ABI is in deltakv_kernels.h. The arithmetic is the one of the Numba reference kernels
 * (deltakv_format/codecs/kernels.py) operation for operation, so results agree bit for bit:
 *   - f32 state, plain IEEE adds and multiplies (no contraction: DKV_FADD/DKV_FMUL, -fmad=false,
 *     -ffp-contract=off), no flush-to-zero, IEEE division;
 *   - f16 -> f32 exact (NaN payloads kept, as numpy's widening); f32 -> f16 round to nearest even
 *     with saturation of finite values, f32 -> bf16 likewise (SPEC.md "Decode arithmetic");
 *   - the Walsh-Hadamard butterflies in the normative order (the data flow of each output value is
 *     the same whether a pair sits in one thread or in two lanes; a + b and b - a across lanes are
 *     single IEEE adds, written as fma(x, +-1, y), which rounds once like the add).
 *
 * Work layout. Decoders: one thread owns VPL consecutive values of a row (VPL = 8 by default, 16
 * selectable), so a warp reads and writes 32 * VPL contiguous values: 16-byte stores, coalesced. The
 * delta decoder gives each thread the same VPL columns of one keyframe chunk; the thread walks the
 * chunk's rows in order with its f32 state in registers, loading several rows ahead. Rotations of
 * size R span R / VPL neighbouring lanes (warp shuffles). Encoders: one thread owns one 32-value
 * block (the searches and error sums run in the reference's sequential order inside a thread).
 */
#include "deltakv_gpu_compat.h"
#include "deltakv_kernels.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

namespace {

constexpr int QK = 32;      // values per Q4_0 / Q8_0 block
constexpr int Q4B = 18;     // bytes per Q4_0 block
constexpr int Q8B = 34;     // bytes per Q8_0 block
constexpr int THREADS = 256;
constexpr int ENC_THREADS = 128;

DKV_DEV float as_f32(uint32_t u) { return __uint_as_float(u); }
DKV_DEV uint32_t as_u32(float f) { return __float_as_uint(f); }
DKV_DEV int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---- element conversions (SPEC.md) --------------------------------------------------------- */

/* f16 bits -> f32, exact. Normals and subnormals: the exponent re-bias is an exact multiply by
 * 2^112 (denormals are not flushed); inf/NaN keep their payload (numpy's widening, the reference LUT). */
DKV_DEV float f16_to_f32(uint32_t h) {
    const uint32_t a = (h & 0x7fffu) << 13;
    uint32_t r = as_u32(DKV_FMUL(as_f32(a), 0x1p112f));
    if (a >= 0x0f800000u) r = a | 0x7f800000u;
    return as_f32(r | ((h & 0x8000u) << 16));
}

/* f32 bits -> f16 bits: round to nearest even, finite values saturate to +-65504, inf kept,
 * NaN -> sign | 0x7e00 (numerics.f32_bits_to_f16_bits). */
DKV_DEV uint32_t f32_to_f16_sat(uint32_t u) {
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u);
    if (a >= 0x38800000u) {
        uint32_t r = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
        if (r >= 0x7c00u) r = 0x7bffu;
        return sign | r;
    }
    const uint32_t e = a >> 23;
    if (e < 102u) return sign;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t s = 126u - e;
    uint32_t q = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u);
    const uint32_t half = 1u << (s - 1u);
    if (rem > half || (rem == half && (q & 1u))) q += 1u;
    return sign | q;
}

/* GGML_FP32_TO_FP16: like the above but finite overflow goes to infinity (ggml's encoders). */
DKV_DEV uint32_t f32_to_f16_ggml(uint32_t u) {
    const uint32_t a = u & 0x7fffffffu;
    if (a < 0x7f800000u && a >= 0x477ff000u) return ((u >> 16) & 0x8000u) | 0x7c00u;
    return f32_to_f16_sat(u);
}

/* f32 bits -> bf16 bits: RNE, finite overflow saturates to 0x7f7f, NaN -> sign | 0x7fc0. */
DKV_DEV uint32_t f32_to_bf16(uint32_t u) {
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return ((u >> 16) & 0x8000u) | 0x7fc0u;
    if (a == 0x7f800000u) return u >> 16;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    if ((r & 0x7fffu) == 0x7f80u) r -= 1u;
    return r;
}

/* N f32 -> N f16 bit patterns, packed two per word (even index in the low half). */
template <int N>
DKV_DEV void pack_f16(const float (&v)[N], uint32_t (&w)[N / 2]) {
#if DKV_HW_F16
    /* cvt.rn.f16x2.f32 rounds to nearest even with subnormals, as specified, for |x| <= 65504;
     * a vector holding anything else (overflow, inf, NaN: never in encoder output) takes the
     * integer path. One predicate chain and one branch per vector. */
    bool bad = false;
#pragma unroll
    for (int k = 0; k < N; ++k) bad |= !(fabsf(v[k]) <= 65504.0f);
    if (!bad) {
#pragma unroll
        for (int i = 0; i < N / 2; ++i) {
            const __half2_raw raw = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
            w[i] = (uint32_t)raw.x | ((uint32_t)raw.y << 16);
        }
        return;
    }
#endif
#pragma unroll
    for (int i = 0; i < N / 2; ++i)
        w[i] = f32_to_f16_sat(as_u32(v[2 * i])) | (f32_to_f16_sat(as_u32(v[2 * i + 1])) << 16);
}

template <int KIND>
DKV_DEV float bits_to_f32(uint32_t b) {
    if constexpr (KIND == DKV_KIND_F16) return f16_to_f32(b);
    else if constexpr (KIND == DKV_KIND_BF16) return as_f32(b << 16);
    else return as_f32(b);
}

/* ---- vector loads and stores of N consecutive elements (16-byte aligned) ------------------ */

template <int KIND, int N>
DKV_DEV void load_bits(const void* base, int64_t elem, uint32_t (&b)[N]) {
    if constexpr (KIND == DKV_KIND_F32) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint32_t*>(base) + elem);
#pragma unroll
        for (int k = 0; k < N / 4; ++k) {
            const uint4 v = p[k];
            b[4 * k + 0] = v.x; b[4 * k + 1] = v.y; b[4 * k + 2] = v.z; b[4 * k + 3] = v.w;
        }
    } else {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + elem);
#pragma unroll
        for (int k = 0; k < N / 8; ++k) {
            const uint4 v = p[k];
            const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                b[8 * k + 2 * i] = w[i] & 0xffffu;
                b[8 * k + 2 * i + 1] = w[i] >> 16;
            }
        }
    }
}

template <int KIND, int N>
DKV_DEV void store_bits(void* base, int64_t elem, const uint32_t (&b)[N]) {
    if constexpr (KIND == DKV_KIND_F32) {
        uint4* p = reinterpret_cast<uint4*>(static_cast<uint32_t*>(base) + elem);
#pragma unroll
        for (int k = 0; k < N / 4; ++k) {
            uint4 v;
            v.x = b[4 * k + 0]; v.y = b[4 * k + 1]; v.z = b[4 * k + 2]; v.w = b[4 * k + 3];
            p[k] = v;
        }
    } else {
        uint4* p = reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + elem);
#pragma unroll
        for (int k = 0; k < N / 8; ++k) {
            uint4 v;
            v.x = b[8 * k + 0] | (b[8 * k + 1] << 16);
            v.y = b[8 * k + 2] | (b[8 * k + 3] << 16);
            v.z = b[8 * k + 4] | (b[8 * k + 5] << 16);
            v.w = b[8 * k + 6] | (b[8 * k + 7] << 16);
            p[k] = v;
        }
    }
}

/* f32 values -> output elements of KIND (the one rounding of SPEC.md). */
template <int KIND, int N>
DKV_DEV void store_values(void* base, int64_t elem, const float (&v)[N]) {
    if constexpr (KIND == DKV_KIND_F32) {
        uint32_t b[N];
#pragma unroll
        for (int k = 0; k < N; ++k) b[k] = as_u32(v[k]);
        store_bits<KIND, N>(base, elem, b);
    } else {
        uint32_t w[N / 2];
        if constexpr (KIND == DKV_KIND_F16) {
            pack_f16<N>(v, w);
        } else {
#pragma unroll
            for (int i = 0; i < N / 2; ++i) w[i] = f32_to_bf16(as_u32(v[2 * i])) | (f32_to_bf16(as_u32(v[2 * i + 1])) << 16);
        }
        uint4* p = reinterpret_cast<uint4*>(static_cast<uint16_t*>(base) + elem);
#pragma unroll
        for (int k = 0; k < N / 8; ++k) {
            uint4 q;
            q.x = w[4 * k]; q.y = w[4 * k + 1]; q.z = w[4 * k + 2]; q.w = w[4 * k + 3];
            p[k] = q;
        }
    }
}

/* ---- warp helpers ---------------------------------------------------------------------------- */

DKV_DEV int warp_max(int x) {
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) {
        const int y = (int)DKV_SHFL_XOR_U32((uint32_t)x, m);
        x = x > y ? x : y;
    }
    return x;
}

DKV_DEV uint32_t warp_or8(uint32_t x) {  // OR over aligned groups of 8 lanes
    x |= DKV_SHFL_XOR_U32(x, 1);
    x |= DKV_SHFL_XOR_U32(x, 2);
    x |= DKV_SHFL_XOR_U32(x, 4);
    return x;
}

template <int N>
DKV_DEV void shfl_xor_array(const float (&v)[N], float (&p)[N], int m) {
#if defined(DKV_EMU)
    dkv_emu::exchange(reinterpret_cast<const uint32_t*>(v), reinterpret_cast<uint32_t*>(p), N, m);
#else
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = as_f32(DKV_SHFL_XOR_U32(as_u32(v[j]), m));
#endif
}

/* Normalised Walsh-Hadamard transform over groups of ROT values; this thread holds VPL consecutive
 * values (column = slice * VPL + j) and the lanes of one group are neighbours, lane bit m of the
 * slice index = column bit m * VPL. Stages h = 1, 2, ..., ROT/2: pairs (c, c + h), a' = a + b,
 * b' = a - b; then a multiply by 1/sqrt(ROT) (kernels._hadamard_inplace). */
template <int VPL, int ROT>
DKV_DEV void hadamard(float (&v)[VPL], int lane) {
    if constexpr (ROT != 0) {
        constexpr int IN = VPL < ROT ? VPL : ROT;
#pragma unroll
        for (int h = 1; h < IN; h <<= 1) {
#pragma unroll
            for (int j = 0; j < VPL; ++j) {
                if ((j & h) == 0) {
                    const float a = v[j], b = v[j + h];
                    v[j] = a + b;
                    v[j + h] = a - b;
                }
            }
        }
#pragma unroll
        for (int h = VPL; h < ROT; h <<= 1) {
            const int m = h / VPL;
            float p[VPL];
            shfl_xor_array<VPL>(v, p, m);
            const float sg = (lane & m) ? -1.0f : 1.0f;  // upper lane: p - v; lower lane: v + p
#pragma unroll
            for (int j = 0; j < VPL; ++j) v[j] = DKV_FMA(v[j], sg, p[j]);
        }
        constexpr float sc = ROT == 16 ? 0.25f : (ROT == 64 ? 0.125f : 0.0625f);
#pragma unroll
        for (int j = 0; j < VPL; ++j) v[j] = DKV_FMUL(v[j], sc);
    }
}

/* ---- quantized blocks ------------------------------------------------------------------------ */

DKV_DEV float q4f(uint32_t q) { return as_f32(0x4b000000u | q) - 8388616.0f; }               // q - 8, exact
DKV_DEV float q8f(uint32_t byte) { return as_f32(0x4b000000u | (byte ^ 0x80u)) - 8388736.0f; }  // int8, exact

/* Thread's slice of one Q4_0 block: its scale and the VPL/2 u16 words holding its VPL nibbles. */
template <int VPL>
DKV_DEV void load_q4_slice(const uint16_t* blk, int qw, uint32_t& d, uint32_t (&w)[VPL / 2]) {
    d = blk[0];
#pragma unroll
    for (int k = 0; k < VPL / 2; ++k) w[k] = blk[1 + qw + k];
}

template <int VPL>
DKV_DEV float q4_value(const uint32_t (&w)[VPL / 2], int k, int shift) {
    return q4f((w[k >> 1] >> ((k & 1) * 8 + shift)) & 0xfu);
}

/* ---- decode kernels -------------------------------------------------------------------------- */

template <int SRC, int DST, int VPL>
__global__ void __launch_bounds__(THREADS)
k_convert(const void* __restrict__ src, int64_t total_lanes, void* __restrict__ out) {
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= total_lanes) return;
    uint32_t b[VPL];
    load_bits<SRC, VPL>(src, t * VPL, b);
    float v[VPL];
#pragma unroll
    for (int k = 0; k < VPL; ++k) v[k] = bits_to_f32<SRC>(b[k]);
    store_values<DST, VPL>(out, t * VPL, v);
}

/* Plain block decoders: the blocks of all rows are one contiguous row-major array, so the thread's
 * block is simply (first value / 32): no row/column division. */
template <int KIND, int VPL>
__global__ void __launch_bounds__(THREADS)
k_decode_q4_0(const uint8_t* __restrict__ blocks, int64_t n_values, int64_t total_lanes, void* __restrict__ out) {
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= total_lanes) return;
    const int p = (int)((t * VPL) & 31);  // position of the first value inside its block
    const uint16_t* blk = reinterpret_cast<const uint16_t*>(blocks + ((t * VPL) >> 5) * Q4B);
    uint32_t dh, w[VPL / 2];
    load_q4_slice<VPL>(blk, (p & 15) >> 1, dh, w);
    const float d = f16_to_f32(dh);
    const int shift = (p & 16) ? 4 : 0;
    float v[VPL];
#pragma unroll
    for (int k = 0; k < VPL; ++k) v[k] = DKV_FMUL(d, q4_value<VPL>(w, k, shift));
    store_values<KIND, VPL>(out, t * VPL, v);
}

template <int KIND, int VPL>
__global__ void __launch_bounds__(THREADS)
k_decode_q8_0(const uint8_t* __restrict__ blocks, int64_t n_values, int64_t total_lanes, void* __restrict__ out) {
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= total_lanes) return;
    const int p = (int)((t * VPL) & 31);
    const uint16_t* blk = reinterpret_cast<const uint16_t*>(blocks + ((t * VPL) >> 5) * Q8B);
    const float d = f16_to_f32(blk[0]);
    uint32_t w[VPL / 2];
#pragma unroll
    for (int k = 0; k < VPL / 2; ++k) w[k] = blk[1 + (p >> 1) + k];
    float v[VPL];
#pragma unroll
    for (int k = 0; k < VPL; ++k) v[k] = DKV_FMUL(d, q8f((w[k >> 1] >> ((k & 1) * 8)) & 0xffu));
    store_values<KIND, VPL>(out, t * VPL, v);
}

/* Delta decode (kernels.decode_delta): thread = (chunk, VPL columns); rows of a chunk in order. */
/* Resident 256-thread blocks per SM that the register budget must allow: 3 (24 warps, <= 80
 * registers, no spills on sm_90) for VPL = 8; VPL = 16 needs more registers and keeps 1. */
#ifndef DKV_DECODE_MIN_BLOCKS
#define DKV_DECODE_MIN_BLOCKS(vpl) ((vpl) == 8 ? 3 : 1)
#endif
template <int KIND, int VPL, int ROT, bool MODES>
__global__ void __launch_bounds__(THREADS, DKV_DECODE_MIN_BLOCKS(VPL))
k_decode_delta(const void* __restrict__ keys, const uint8_t* __restrict__ q4, const uint8_t* __restrict__ modes,
               int64_t n_values, int64_t interval, int64_t row_lo, int64_t row_hi, int64_t first_chunk,
               int64_t total_lanes, void* __restrict__ out) {
    constexpr int U = 32 / VPL;  // rows loaded ahead of use
    const int64_t S = n_values / VPL;
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    const int lane = (int)(threadIdx.x & 31);
    const bool valid = t < total_lanes;
    const int64_t tt = valid ? t : total_lanes - 1;
    const int64_t cl = tt / S;
    const int64_t col = (tt - cl * S) * VPL;
    const int64_t chunk = first_chunk + cl;
    const int64_t start = chunk * interval;
    const int64_t stop = min64(start + interval, row_hi);
    const int n_iter = warp_max(valid ? (int)(stop - start - 1) : 0);  // uniform over the warp

    float st[VPL];
    {
        uint32_t kb[VPL];
        load_bits<KIND, VPL>(keys, chunk * n_values + col, kb);
        if (valid && start >= row_lo) store_bits<KIND, VPL>(out, (start - row_lo) * n_values + col, kb);
#pragma unroll
        for (int k = 0; k < VPL; ++k) st[k] = bits_to_f32<KIND>(kb[k]);
    }
    hadamard<VPL, ROT>(st, lane);

    const int64_t nb = n_values / QK;
    const int64_t qstride = nb * Q4B / 2;  // u16 words per delta row
    const int64_t mrow = (nb + 7) >> 3;
    const int64_t b = col / QK;
    const int shift = (col & 16) ? 4 : 0;
    const int qw = (int)(col & 15) >> 1;
    const int mbit = (int)(b & 7);
    const int64_t d0 = chunk * (interval - 1);  // delta index of row start + 1
    // Running pointers (no 64-bit multiplies in the row loop): q4/mode rows of local row j0, output row.
    const uint16_t* qp = reinterpret_cast<const uint16_t*>(q4) + d0 * qstride + b * (Q4B / 2);
    const uint8_t* mp = MODES ? modes + d0 * mrow + (b >> 3) : nullptr;
    constexpr int ESZ = KIND == DKV_KIND_F32 ? 4 : 2;
    char* op = static_cast<char*>(out) + ((start + 1 - row_lo) * n_values + col) * ESZ;  // row start + 1
    const int64_t ostride = n_values * ESZ;
    const int rows_left = valid ? (int)(stop - start - 1) : -1;                 // rows j = 1..rows_left exist
    const int first_emit = (int)(row_lo - start > 1 ? row_lo - start : 1);  // rows before row_lo are not written

    for (int j0 = 1; j0 <= n_iter; j0 += U) {
        uint32_t dv[U], w[U][VPL / 2], mv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            dv[u] = 0;
            mv[u] = 0;
#pragma unroll
            for (int k = 0; k < VPL / 2; ++k) w[u][k] = 0;
            if (j0 + u <= rows_left) {
                load_q4_slice<VPL>(qp + u * qstride, qw, dv[u], w[u]);
                if (MODES) mv[u] = mp[u * mrow];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u;
            if (j > n_iter) break;  // uniform over the warp
            const float d = f16_to_f32(dv[u]);
            // state = (inter ? state : -0) + d * (q - 8): one fused multiply-add is exact here because
            // d * (q - 8) is exact in f32 (11 x 4 significant bits), so it rounds once like the add; -0
            // is the identity of the add, so intra blocks get d * (q - 8) bit for bit.
            uint32_t keep = 0xffffffffu;
            if (MODES) keep = ((mv[u] >> mbit) & 1u) ? 0xffffffffu : 0u;
#pragma unroll
            for (int k = 0; k < VPL; ++k) {
                const float qf = q4_value<VPL>(w[u], k, shift);
                const float base = MODES ? as_f32((as_u32(st[k]) & keep) | (~keep & 0x80000000u)) : st[k];
                st[k] = DKV_FMA(d, qf, base);
            }
            const bool emit = j <= rows_left && j >= first_emit;
            if constexpr (ROT != 0) {
                float e[VPL];
#pragma unroll
                for (int k = 0; k < VPL; ++k) e[k] = st[k];
                hadamard<VPL, ROT>(e, lane);
                if (emit) store_values<KIND, VPL>(op + (int64_t)(j - 1) * ostride, 0, e);
            } else {
                if (emit) store_values<KIND, VPL>(op + (int64_t)(j - 1) * ostride, 0, st);
            }
        }
        qp += U * qstride;
        if (MODES) mp += U * mrow;
    }
}

/* ---- encode kernels -------------------------------------------------------------------------- */

/* ggml quantize_row_q4_0_ref for one block: returns the f16 scale bits, the 16 code bytes packed
 * into 8 little-endian u16 words (byte j = code j | code j+16 << 4). */
DKV_DEV uint32_t quant_q4_0_ggml(const float (&x)[QK], uint32_t (&words)[8]) {
    float amax = 0.0f, vmax = 0.0f;
#pragma unroll
    for (int j = 0; j < QK; ++j) {
        const float a = fabsf(x[j]);
        if (amax < a) {
            amax = a;
            vmax = x[j];
        }
    }
    const float d = vmax / -8.0f;
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) words[k] = 0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        int q0 = (int8_t)(int32_t)DKV_FADD(DKV_FMUL(x[j], inv), 8.5f);
        int q1 = (int8_t)(int32_t)DKV_FADD(DKV_FMUL(x[16 + j], inv), 8.5f);
        q0 = q0 < 15 ? q0 : 15;
        q1 = q1 < 15 ? q1 : 15;
        words[j >> 1] |= (uint32_t)((q0 & 0xf) | ((q1 & 0xf) << 4)) << ((j & 1) * 8);
    }
    return f32_to_f16_ggml(as_u32(d));
}

DKV_DEV void store_q4_block(uint8_t* blk, uint32_t h, const uint32_t (&words)[8]) {
    uint16_t* o = reinterpret_cast<uint16_t*>(blk);
    o[0] = (uint16_t)h;
#pragma unroll
    for (int k = 0; k < 8; ++k) o[1 + k] = (uint16_t)words[k];
}

template <int KIND>
DKV_DEV void load_block_f32(const void* src, int64_t elem, float (&x)[QK]) {
    uint32_t b[QK];
    load_bits<KIND, QK>(src, elem, b);
#pragma unroll
    for (int j = 0; j < QK; ++j) x[j] = bits_to_f32<KIND>(b[j]);
}

/* Plain block encoders: a block of 32 threads quantizes 32 consecutive blocks (one each) into shared
 * memory, then writes them out as one contiguous run with coalesced 2-byte stores (the blocks are
 * 18 or 34 bytes, so stores straight from each thread would touch a sector per thread). */
constexpr int STAGE_THREADS = 32;

template <int KIND>
__global__ void __launch_bounds__(STAGE_THREADS)
k_encode_q4_0(const void* __restrict__ src, int64_t n_values, int64_t total, uint8_t* __restrict__ blocks) {
    __shared__ uint16_t stage[STAGE_THREADS * (Q4B / 2)];
    const int lane = (int)threadIdx.x;
    const int64_t t0 = (int64_t)blockIdx.x * STAGE_THREADS;
    if (t0 + lane < total) {
        float x[QK];
        load_block_f32<KIND>(src, (t0 + lane) * QK, x);
        uint32_t words[8];
        stage[lane * (Q4B / 2)] = (uint16_t)quant_q4_0_ggml(x, words);
#pragma unroll
        for (int k = 0; k < 8; ++k) stage[lane * (Q4B / 2) + 1 + k] = (uint16_t)words[k];
    }
    __syncthreads();
    const int n = (int)min64(STAGE_THREADS, total - t0) * (Q4B / 2);
    uint16_t* o = reinterpret_cast<uint16_t*>(blocks + t0 * Q4B);
    for (int i = lane; i < n; i += STAGE_THREADS) o[i] = stage[i];
}

DKV_DEV float round_half_away(float v) {  // C roundf, as kernels._round_half_away
    const float a = fabsf(v);
    float t = floorf(a);
    if (a - t >= 0.5f) t += 1.0f;
    return v >= 0.0f ? t : -t;
}

template <int KIND>
__global__ void __launch_bounds__(STAGE_THREADS)
k_encode_q8_0(const void* __restrict__ src, int64_t n_values, int64_t total, uint8_t* __restrict__ blocks) {
    __shared__ uint16_t stage[STAGE_THREADS * (Q8B / 2)];
    const int lane = (int)threadIdx.x;
    const int64_t t0 = (int64_t)blockIdx.x * STAGE_THREADS;
    if (t0 + lane < total) {
        float x[QK];
        load_block_f32<KIND>(src, (t0 + lane) * QK, x);
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < QK; ++j) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f;
        const float inv = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t* o = stage + lane * (Q8B / 2);
        o[0] = (uint16_t)f32_to_f16_ggml(as_u32(d));
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const uint32_t q0 = (uint32_t)(int32_t)round_half_away(DKV_FMUL(x[2 * k], inv)) & 0xffu;
            const uint32_t q1 = (uint32_t)(int32_t)round_half_away(DKV_FMUL(x[2 * k + 1], inv)) & 0xffu;
            o[1 + k] = (uint16_t)(q0 | (q1 << 8));
        }
    }
    __syncthreads();
    const int n = (int)min64(STAGE_THREADS, total - t0) * (Q8B / 2);
    uint16_t* out = reinterpret_cast<uint16_t*>(blocks + t0 * Q8B);
    for (int i = lane; i < n; i += STAGE_THREADS) out[i] = stage[i];
}

/* ---- the dkv-q4 scale search (simd.dkv_search_group), per block of 32 values in one thread ----
 *
 * Codes: k = q - 8 = rint(clamp(x / d, -8, 7)), with x * (1/d) as the reference, rint by the
 * 1.5 * 2^23 trick (exact RNE once |y| <= 2^22; (y + M) - M is +0, never -0, for a zero code: the
 * decoder's q - 8). Reconstruction d * k is exact in f32 (11 x 4 significant bits), so
 * base + d * k and d * k - target are single fused operations that round once, like the
 * reference's add and subtract. Errors are summed in value order, one candidate at a time.
 *
 * Work saved without changing a result (the reference evaluates 7 level candidates + a refit per
 * mode; this does 5 + 1 on every block whose scales are not f16-subnormal-tiny):
 *   - CLAMP: with Y = fl(amax * |1/d|) >= every |y| (rounding is monotone), a clamp side that no y
 *     can reach is dropped: none when Y < 7.5, the upper one only when Y <= 8.5;
 *   - levels 7 and 6.5 mirror -7 and -6.5: d(-L) = -d(L) exactly (IEEE division and the f16
 *     rounding are odd), so their codes are k(-L) = -rint(clamp(-y)) = rint(clamp(y, -7, 8)), the
 *     same as level L's rint(y) whenever Y < 7.5 (no clamp reached on either side): equal
 *     reconstructions, equal errors, and the earlier level (-7 before 7, -6.5 before 6.5) wins the
 *     tie, so 7 and 6.5 can never be chosen and are not evaluated.
 * A block that misses a condition (tiny or saturated scales) takes the plain 7-candidate path. */

constexpr float RINT_MAGIC = 12582912.0f;  // 1.5 * 2^23
constexpr uint32_t RINT_MAGIC_CODE8 = 0x4b400000u - 8u;  // bits(M + k) - this = k + 8, the code

template <int CLAMP>  // 2: both sides; 1: upper side only (y >= -8.5 known); 0: none (|y| < 7.5 known)
DKV_DEV float kcode_t(float x, float inv, float& t) {
    float y = DKV_FMUL(x, inv);
    if constexpr (CLAMP == 2) y = fmaxf(y, -8.0f);
    if constexpr (CLAMP >= 1) y = fminf(y, 7.0f);
    t = DKV_FADD(y, RINT_MAGIC);
    return DKV_FADD(t, -RINT_MAGIC);
}
template <int CLAMP>
DKV_DEV float kcode(float x, float inv) {
    float t;
    return kcode_t<CLAMP>(x, inv, t);
}

DKV_DEV float safe_inv(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

/* The reference's block error for scale d: x = the coded values (residual or target). */
template <bool INTER, int CLAMP>
DKV_DEV float block_err(const float (&x)[QK], const float (&tg)[QK], const float (&st)[QK], float d, float inv) {
    float err = 0.0f;
#pragma unroll
    for (int j = 0; j < QK; ++j) {
        const float k = kcode<CLAMP>(x[j], inv);
        const float e = INTER ? DKV_FADD(DKV_FMA(d, k, st[j]), -tg[j]) : DKV_FMA(d, k, -tg[j]);
        err = DKV_FADD(err, DKV_FMUL(e, e));
    }
    return err;
}

template <bool INTER>
DKV_DEV float block_err_any(int clamp, const float (&x)[QK], const float (&tg)[QK], const float (&st)[QK], float d,
                            float inv) {
    if (clamp == 0) return block_err<INTER, 0>(x, tg, st, d, inv);
    if (clamp == 1) return block_err<INTER, 1>(x, tg, st, d, inv);
    return block_err<INTER, 2>(x, tg, st, d, inv);
}

/* The clamp a scale needs (see CLAMP above), from Y = fl(amax * |inv|). */
DKV_DEV int clamp_need(float amax, float inv) {
    const float y = DKV_FMUL(amax, fabsf(inv));
    return y < 7.5f ? 0 : (y <= 8.5f ? 1 : 2);
}

/* Least-squares refit sums over the codes of scale 1/inv: num = sum x k in value order (rounded);
 * den = sum k k is exact in any order (integers below 2^12), so one fused multiply-add each. */
template <int CLAMP>
DKV_DEV void refit_sums(const float (&x)[QK], float inv, float& num, float& den) {
    num = 0.0f;
    den = 0.0f;
#pragma unroll
    for (int j = 0; j < QK; ++j) {
        const float k = kcode<CLAMP>(x[j], inv);
        num = DKV_FADD(num, DKV_FMUL(x[j], k));
        den = DKV_FMA(k, k, den);
    }
}

DKV_DEV float search_level(int li) {  // simd.SEARCH_LEVELS: -8, -7.5, -7, -6.5, 7, 6.5, 6
    return li < 4 ? -8.0f + 0.5f * (float)li : 7.0f - 0.5f * (float)(li - 4);
}

/* simd.dkv_search_group for one block and mode: the error and the f16 bits of the chosen scale. */
template <bool INTER>
DKV_DEV void search_block(const float (&x)[QK], const float (&tg)[QK], const float (&st)[QK], float& best_err,
                          uint32_t& best_h) {
    float amax = 0.0f, vmax = 0.0f;
#pragma unroll
    for (int j = 0; j < QK; ++j) {  // the first value of largest magnitude
        const float a = fabsf(x[j]);
        if (amax < a) {
            amax = a;
            vmax = x[j];
        }
    }
    best_h = 0;
    best_err = 0.0f;
    if (amax == 0.0f) return;  // scale 0, codes 8, error 0; no refit
    best_err = as_f32(0x7f800000u);
    float best_inv = 0.0f;
    int best_clamp = 2;
    // The five candidates of the fast path, in the reference's order: -8, -7.5, -7, -6.5, 6.
    uint32_t hs[5];
    float ds[5], invs[5];
    hs[0] = f32_to_f16_sat(as_u32(DKV_FMUL(vmax, -0.125f)));  // x / -8 == x * -0.125 exactly
    hs[1] = f32_to_f16_sat(as_u32(vmax / -7.5f));
    hs[2] = f32_to_f16_sat(as_u32(vmax / -7.0f));
    hs[3] = f32_to_f16_sat(as_u32(vmax / -6.5f));
    hs[4] = f32_to_f16_sat(as_u32(vmax / 6.0f));
    bool fast = true;
#pragma unroll
    for (int c = 0; c < 5; ++c) {
        ds[c] = f16_to_f32(hs[c]);
        invs[c] = safe_inv(ds[c]);
        fast &= clamp_need(amax, invs[c]) <= (c < 2 ? 1 : 0);
    }
    if (fast) {
        // Loops of one candidate per trip (a 32-value body each); the candidate's scale is picked
        // by selects so that the arrays stay in registers.
#pragma unroll 1
        for (int c = 0; c < 5; ++c) {
            uint32_t h = hs[0];
            float d = ds[0], inv = invs[0];
#pragma unroll
            for (int i = 1; i < 5; ++i) {
                h = c == i ? hs[i] : h;
                d = c == i ? ds[i] : d;
                inv = c == i ? invs[i] : inv;
            }
            const float err = c < 2 ? block_err<INTER, 1>(x, tg, st, d, inv) : block_err<INTER, 0>(x, tg, st, d, inv);
            if (err < best_err) {
                best_err = err;
                best_h = h;
                best_inv = inv;
                best_clamp = c < 2 ? 1 : 0;
            }
        }
    } else {
#pragma unroll 1
        for (int li = 0; li < 7; ++li) {
            const uint32_t h = f32_to_f16_sat(as_u32(vmax / search_level(li)));
            const float d = f16_to_f32(h);
            const float inv = safe_inv(d);
            const float err = block_err<INTER, 2>(x, tg, st, d, inv);
            if (err < best_err) {
                best_err = err;
                best_h = h;
                best_inv = inv;
            }
        }
    }
    // Least-squares scale for the chosen codes, then requantise once.
    float num, den;
    if (best_clamp == 0) refit_sums<0>(x, best_inv, num, den);
    else if (best_clamp == 1) refit_sums<1>(x, best_inv, num, den);
    else refit_sums<2>(x, best_inv, num, den);
    if (den > 0.0f) {
        const uint32_t h = f32_to_f16_sat(as_u32(num / den));
        const float d = f16_to_f32(h);
        if (d == d && fabsf(d) < 65504.0f) {
            const float inv = safe_inv(d);
            const float err = block_err_any<INTER>(clamp_need(amax, inv), x, tg, st, d, inv);
            if (err < best_err) {
                best_err = err;
                best_h = h;
            }
        }
    }
}

/* The chosen block: codes packed as store_q4_block wants them, and the state advanced as the
 * decoder does (inter: base + d * k, one rounding; intra: d * k). */
template <bool INTER>
DKV_DEV void emit_block(const float (&x)[QK], float d, float (&st)[QK], uint32_t (&words)[8]) {
    const float inv = safe_inv(d);
#pragma unroll
    for (int k = 0; k < 8; ++k) words[k] = 0;
#pragma unroll
    for (int j = 0; j < QK; ++j) {
        float t;
        const float k = kcode_t<2>(x[j], inv, t);
        const uint32_t c = as_u32(t) - RINT_MAGIC_CODE8;
        words[(j & 15) >> 1] |= c << ((j & 1) * 8 + (j >= 16 ? 4 : 0));
        st[j] = INTER ? DKV_FMA(d, k, st[j]) : DKV_FMUL(d, k);
    }
}

/* Closed-loop delta encoder (kernels.encode_delta): thread = (chunk, 32-value block). */
template <int KIND, int ROT>
__global__ void __launch_bounds__(ENC_THREADS, 4)  /* <= 128 registers: 16 warps per SM */
k_encode_delta(const void* __restrict__ src, int64_t n_rows, int64_t n_values, int64_t interval, int adaptive,
               int search, int64_t nb_pad, int64_t total_lanes, void* __restrict__ keys, uint8_t* __restrict__ q4,
               uint8_t* __restrict__ modes) {
    const int64_t nb = n_values / QK;
    const int64_t t = (int64_t)blockIdx.x * ENC_THREADS + threadIdx.x;
    const int lane = (int)(threadIdx.x & 31);
    const int64_t tt = t < total_lanes ? t : 0;
    const int64_t chunk = tt / nb_pad;
    const int64_t b = tt - chunk * nb_pad;
    const bool valid = t < total_lanes && b < nb;
    const int64_t col = (valid ? b : 0) * QK;
    const int64_t start = chunk * interval;
    const int64_t stop = min64(start + interval, n_rows);
    const int n_iter = warp_max(valid ? (int)(stop - start - 1) : 0);

    float st[QK], tg[QK];
    {
        uint32_t kb[QK];
        load_bits<KIND, QK>(src, start * n_values + col, kb);
        if (valid) store_bits<KIND, QK>(keys, chunk * n_values + col, kb);
#pragma unroll
        for (int j = 0; j < QK; ++j) st[j] = bits_to_f32<KIND>(kb[j]);
    }
    hadamard<QK, ROT>(st, lane);

    const int64_t qrow = nb * Q4B;
    const int64_t mrow = (nb + 7) >> 3;
    const int64_t d0 = chunk * (interval - 1);
    for (int j = 1; j <= n_iter; ++j) {
        const int64_t i = start + j;
        const bool ok = valid && i < stop;
        if (ok) {
            load_block_f32<KIND>(src, i * n_values + col, tg);
        } else {
#pragma unroll
            for (int k = 0; k < QK; ++k) tg[k] = 0.0f;
        }
        hadamard<QK, ROT>(tg, lane);
        bool inter = true;
        if (ok) {
            uint32_t h = 0, words[8];
            uint8_t* blk = q4 + (d0 + j - 1) * qrow + b * Q4B;
            if (search) {
                float r[QK];  // the residual row of the reference
#pragma unroll
                for (int k = 0; k < QK; ++k) r[k] = tg[k] - st[k];
                float err_inter;
                search_block<true>(r, tg, st, err_inter, h);
                if (adaptive) {  // intra only when strictly better
                    float err_intra;
                    uint32_t h_intra;
                    search_block<false>(tg, tg, st, err_intra, h_intra);
                    if (err_intra < err_inter) {
                        inter = false;
                        h = h_intra;
                    }
                }
                const float d = f16_to_f32(h);
                if (inter) emit_block<true>(r, d, st, words);
                else emit_block<false>(tg, d, st, words);
                store_q4_block(blk, h, words);
            } else {
                // ggml's Q4_0 rule on the residual; with no error computed, intra never wins.
                float x[QK];
#pragma unroll
                for (int k = 0; k < QK; ++k) x[k] = tg[k] - st[k];
                h = quant_q4_0_ggml(x, words);
                store_q4_block(blk, h, words);
                const float d = f16_to_f32(h);
                // Advance the state exactly as the decoder does (closed loop).
#pragma unroll
                for (int k = 0; k < QK; ++k) {
                    const uint32_t c = (words[(k & 15) >> 1] >> ((k & 1) * 8 + (k >= 16 ? 4 : 0))) & 0xfu;
                    st[k] = DKV_FMA(d, q4f(c), st[k]);  // d * (q - 8) is exact: one rounding, as the add
                }
            }
        }
        if (adaptive) {
            const uint32_t bits = warp_or8((ok && inter) ? 1u << (b & 7) : 0u);
            if (ok && (b & 7) == 0) modes[(d0 + j - 1) * mrow + (b >> 3)] = (uint8_t)bits;
        }
    }
}

/* ---- benchmark and check helpers ------------------------------------------------------------- */

DKV_DEV uint32_t hash32(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return (uint32_t)x;
}

DKV_DEV float unit(uint32_t h) { return (float)(h >> 8) * (1.0f / 8388608.0f) - 1.0f; }  // [-1, 1)

template <int KIND>
__global__ void __launch_bounds__(THREADS)
k_fill_random(void* __restrict__ dst, int64_t n_rows, int64_t n_values, uint64_t seed, float scale) {
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= n_rows * n_values) return;
    const int64_t row = t / n_values, col = t - row * n_values;
    const uint64_t cs = seed * 0x9e3779b97f4a7c15ull + (uint64_t)col;
    const float base = unit(hash32(cs));                       // per-column offset
    const float amp = (hash32(cs ^ 0x1234567ull) & 15u) == 0 ? 8.0f : 1.0f;  // outlier channels
    const float freq = 0.001f + 0.05f * (0.5f + 0.5f * unit(hash32(cs ^ 0xabcdefull)));
    const float drift = sinf(freq * (float)(row & 0xffffff) + 6.0f * unit(hash32(cs ^ 0x777ull)));
    const float noise = unit(hash32(cs ^ ((uint64_t)row << 20) ^ 0x5555ull));
    const float v = scale * amp * (0.5f * base + 0.35f * drift + 0.15f * noise);
    if constexpr (KIND == DKV_KIND_F32) static_cast<uint32_t*>(dst)[t] = as_u32(v);
    else if constexpr (KIND == DKV_KIND_BF16) static_cast<uint16_t*>(dst)[t] = (uint16_t)f32_to_bf16(as_u32(v));
    else static_cast<uint16_t*>(dst)[t] = (uint16_t)f32_to_f16_sat(as_u32(v));
}

template <int KIND>
__global__ void __launch_bounds__(THREADS)
k_find_nonfinite(const void* __restrict__ src, int64_t n, unsigned long long* first) {
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= n) return;
    bool bad;
    if constexpr (KIND == DKV_KIND_F32) {
        bad = !(fabsf(as_f32(static_cast<const uint32_t*>(src)[t])) <= 65504.0f);
    } else {
        const uint32_t h = static_cast<const uint16_t*>(src)[t];
        if constexpr (KIND == DKV_KIND_F16) bad = (h & 0x7c00u) == 0x7c00u;
        else bad = (h & 0x7f80u) == 0x7f80u || (h & 0x7fffu) > 0x477fu;
    }
    if (bad) atomicMin(first, (unsigned long long)t);
}

/* ---- dkv-ans (SPEC.md 6.5; deltakv_format/codecs/ans.py) -------------------------------------------
 *
 * Rotary angles: rope_cos_sin in f64, every operation rounded on its own (DKV_DADD/DKV_DSUB/DKV_DMUL:
 * __dadd_rn etc. on CUDA, never contracted), the same constants and order as ans.rope_cos_sin.
 * Decoder: one thread per rANS stream (streams are independent), the class tables in shared memory
 * as (cum << 16 | freq) per symbol, the symbol of a 12-bit slot found by a 5-step binary search over
 * the cumulative frequencies (the s with cum[s] <= slot < cum[s+1], as the reference's LUT), values
 * f32(q) * step + mean in f32, rotated by the table of rope_cos_sin (a separate kernel) and emitted
 * with the SPEC.md rounding. The state is kept in 32 bits: f * (x >> 12) + (slot - cum) < f * 2^20
 * <= 2^32 whenever the frequencies add up to 4096 (the host checks them: dkv_ans.parse_head). */

constexpr int ANS_MAX_CLASSES = 64;
constexpr int ANS_MAX_HALF = 128;  // neox: half of the rotated dims buffered per thread (n_rot <= 256)
#if defined(DKV_EMU)
constexpr int ANS_THREADS = 32;  // the emulator's __syncthreads covers one warp
#else
constexpr int ANS_THREADS = 64;
#endif

constexpr double TWO_OVER_PI = 0x1.45f306dc9c883p-1;
constexpr double PIO2_HI = 0x1.921fb00000000p+0;
constexpr double PIO2_LO = 0x1.5110b4611a626p-22;

DKV_DEV void rope_cos_sin(int32_t position, float theta, float& cs_out, float& sn_out) {
    const double a = DKV_DMUL((double)position, (double)theta);
    const double k = rint(DKV_DMUL(a, TWO_OVER_PI));
    const double r = DKV_DSUB(DKV_DSUB(a, DKV_DMUL(k, PIO2_HI)), DKV_DMUL(k, PIO2_LO));
    const double z = DKV_DMUL(r, r);
    double s = 0x1.952c77030ad4ap-49;                   // S15
    s = DKV_DADD(-0x1.ae7f3e733b81fp-41, DKV_DMUL(z, s));  // S13
    s = DKV_DADD(0x1.6124613a86d09p-33, DKV_DMUL(z, s));   // S11
    s = DKV_DADD(-0x1.ae64567f544e4p-26, DKV_DMUL(z, s));  // S9
    s = DKV_DADD(0x1.71de3a556c734p-19, DKV_DMUL(z, s));   // S7
    s = DKV_DADD(-0x1.a01a01a01a01ap-13, DKV_DMUL(z, s));  // S5
    s = DKV_DADD(0x1.1111111111111p-7, DKV_DMUL(z, s));    // S3
    s = DKV_DADD(-0x1.5555555555555p-3, DKV_DMUL(z, s));   // S1
    const double sin_r = DKV_DADD(r, DKV_DMUL(DKV_DMUL(r, z), s));
    double c = -0x1.6827863b97d97p-53;                   // C9
    c = DKV_DADD(0x1.ae7f3e733b81fp-45, DKV_DMUL(z, c));   // C8
    c = DKV_DADD(-0x1.93974a8c07c9dp-37, DKV_DMUL(z, c));  // C7
    c = DKV_DADD(0x1.1eed8eff8d898p-29, DKV_DMUL(z, c));   // C6
    c = DKV_DADD(-0x1.27e4fb7789f5cp-22, DKV_DMUL(z, c));  // C5
    c = DKV_DADD(0x1.a01a01a01a01ap-16, DKV_DMUL(z, c));   // C4
    c = DKV_DADD(-0x1.6c16c16c16c17p-10, DKV_DMUL(z, c));  // C3
    c = DKV_DADD(0x1.5555555555555p-5, DKV_DMUL(z, c));    // C2
    c = DKV_DADD(-0x1.0000000000000p-1, DKV_DMUL(z, c));   // C1
    const double cos_r = DKV_DADD(1.0, DKV_DMUL(z, c));
    const int quadrant = (int)((long long)k & 3);
    double cs, sn;
    if (quadrant == 0) { cs = cos_r; sn = sin_r; }
    else if (quadrant == 1) { cs = -sin_r; sn = cos_r; }
    else if (quadrant == 2) { cs = -cos_r; sn = -sin_r; }
    else { cs = sin_r; sn = -cos_r; }
    cs_out = (float)cs;
    sn_out = (float)sn;
}

__global__ void __launch_bounds__(THREADS)
k_rope_table(const int32_t* __restrict__ positions, int64_t n_rows, const float* __restrict__ thetas, int64_t n_pairs,
             float* __restrict__ table) {
    const int64_t t = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    if (t >= n_rows * n_pairs) return;
    const int64_t r = t / n_pairs;
    float c, s;
    rope_cos_sin(positions[r], thetas[t - r * n_pairs], c, s);
    table[2 * t] = c;
    table[2 * t + 1] = s;
}

struct AnsArgs {
    const uint16_t* words;
    const uint32_t* starts;
    int64_t n_words, n_streams, n_rows, stream_rows;
    const uint8_t* classes;  // [width]
    const uint8_t* shifts;   // [n_classes]
    const uint16_t* freqs;   // [n_classes][32]
    int n_classes;
    float step;
    const float* means;  // [width]
    int64_t width;
    const float* table;  // [(row_hi - row_lo)][n_rot / 2][2] cos, sin
    int64_t head_dim, n_rot;
    int64_t row_lo, row_hi, first_stream, n_threads;
    void* out;
    unsigned long long* bad;
};

/* a * b - c * d, each product and the difference rounded on their own (a - b is a + (-b) in IEEE). */
DKV_DEV float fsub_mul(float a, float b, float c, float d) { return DKV_FADD(DKV_FMUL(a, b), -DKV_FMUL(c, d)); }

template <int KIND>
DKV_DEV void ans_store(void* out, int64_t i, float v) {
    if constexpr (KIND == DKV_KIND_F32) static_cast<uint32_t*>(out)[i] = as_u32(v);
    else if constexpr (KIND == DKV_KIND_F16) static_cast<uint16_t*>(out)[i] = (uint16_t)f32_to_f16_sat(as_u32(v));
    else static_cast<uint16_t*>(out)[i] = (uint16_t)f32_to_bf16(as_u32(v));
}

struct AnsState {
    uint32_t x;
    int64_t w, w_end;
    bool bad;
};

DKV_DEV void ans_renorm(AnsState& st, const uint16_t* __restrict__ words) {
    if (st.x < 65536u) {
        if (st.w >= st.w_end) {
            st.bad = true;
        } else {
            st.x = (st.x << 16) | (uint32_t)words[st.w];
            st.w += 1;
        }
    }
}

DKV_DEV uint32_t ans_uniform(AnsState& st, const uint16_t* __restrict__ words, int bits) {
    const uint32_t slot = st.x & 4095u;
    const uint32_t v = slot >> (12 - bits);
    st.x = ((st.x >> 12) << (12 - bits)) + (slot & ((1u << (12 - bits)) - 1u));
    ans_renorm(st, words);
    return v;
}

/* One value of column c (class table tab, shift k): ans.decode_streams' inner loop. */
DKV_DEV float ans_value(AnsState& st, const uint16_t* __restrict__ words, const uint32_t* tab, int k, float step,
                        float mean) {
    const uint32_t slot = st.x & 4095u;
    const uint32_t key = (slot << 16) | 0xffffu;
    int s = 0;
    if (tab[s + 16] <= key) s += 16;
    if (tab[s + 8] <= key) s += 8;
    if (tab[s + 4] <= key) s += 4;
    if (tab[s + 2] <= key) s += 2;
    if (tab[s + 1] <= key) s += 1;
    const uint32_t e = tab[s];
    st.x = (e & 0xffffu) * (st.x >> 12) + (slot - (e >> 16));
    ans_renorm(st, words);
    int32_t qq;
    if (s == 31) {
        const uint32_t lo8 = ans_uniform(st, words, 8);
        const uint32_t hi8 = ans_uniform(st, words, 8);
        const int32_t u = (int32_t)(lo8 | (hi8 << 8));
        qq = u >= 32768 ? u - 65536 : u;
    } else {
        qq = s - 15;
    }
    if (k > 0) {
        uint32_t low = ans_uniform(st, words, k < 8 ? k : 8);
        if (k > 8) low |= ans_uniform(st, words, k - 8) << 8;
        qq = qq * (1 << k) + (int32_t)low;
    }
    return DKV_FADD(DKV_FMUL((float)qq, step), mean);
}

/* MODE: 0 none, 1 norm (pairs 2i, 2i+1 of each head), 2 neox (pairs i, i + n_rot/2 of each head). */
template <int KIND, int MODE>
__global__ void __launch_bounds__(ANS_THREADS)
k_decode_ans(AnsArgs a) {
    __shared__ uint32_t s_tab[ANS_MAX_CLASSES * 32];
    __shared__ int s_shift[ANS_MAX_CLASSES];
    for (int j = (int)threadIdx.x; j < a.n_classes; j += ANS_THREADS) {
        uint32_t cum = 0;
        for (int s = 0; s < 32; ++s) {
            const uint32_t f = a.freqs[j * 32 + s];
            s_tab[j * 32 + s] = (cum << 16) | f;
            cum += f;
        }
        s_shift[j] = a.shifts[j];
    }
    __syncthreads();
    const int64_t t = (int64_t)blockIdx.x * ANS_THREADS + threadIdx.x;
    if (t >= a.n_threads) return;
    const int64_t si = a.first_stream + t;
    const uint16_t* __restrict__ words = a.words;
    AnsState st;
    st.w = (int64_t)a.starts[si];
    st.w_end = si + 1 < a.n_streams ? (int64_t)a.starts[si + 1] : a.n_words;
    if (st.w_end - st.w < 2) {
        atomicMin(a.bad, (unsigned long long)si);
        return;
    }
    st.x = (uint32_t)words[st.w] | ((uint32_t)words[st.w + 1] << 16);
    st.w += 2;
    st.bad = st.x < 65536u;
    const int64_t r0 = si * a.stream_rows;
    const int64_t r1 = min64(r0 + a.stream_rows, a.n_rows);
    const int64_t r_stop = min64(r1, a.row_hi);
    const int64_t width = a.width;
    const float step = a.step;
    const uint8_t* __restrict__ classes = a.classes;
    const float* __restrict__ means = a.means;
    const int64_t n_heads = MODE ? width / a.head_dim : 1;
    const int64_t hd = MODE ? a.head_dim : width;
    const int64_t n_rot = a.n_rot, half = n_rot / 2;
    float buf[MODE == 2 ? ANS_MAX_HALF : 1];
    for (int64_t r = r0; r < r_stop && !st.bad; ++r) {
        const bool emit = r >= a.row_lo;
        const int64_t orow = (r - a.row_lo) * width;
        const float* __restrict__ cs = MODE ? a.table + (emit ? (r - a.row_lo) * n_rot : 0) : nullptr;
        int64_t c = 0;
        for (int64_t h = 0; h < n_heads; ++h) {
            const int64_t base = c;
            for (int64_t off = 0; off < hd; ++off, ++c) {
                const int j = classes[c];
                const float v = ans_value(st, words, s_tab + j * 32, s_shift[j], step, means[c]);
                if (!emit) continue;
                if (MODE == 1 && off < n_rot) {
                    if ((off & 1) == 0) {
                        buf[0] = v;
                    } else {
                        const float x0 = buf[0], y0 = v;
                        const float co = cs[off - 1], sn = cs[off];  // pair off / 2: table[2i], table[2i+1]
                        ans_store<KIND>(a.out, orow + c - 1, fsub_mul(x0, co, y0, sn));
                        ans_store<KIND>(a.out, orow + c, DKV_FADD(DKV_FMUL(x0, sn), DKV_FMUL(y0, co)));
                    }
                } else if (MODE == 2 && off < n_rot) {
                    if (off < half) {
                        buf[off] = v;
                    } else {
                        const int64_t i = off - half;
                        const float x0 = buf[i], y0 = v;
                        const float co = cs[2 * i], sn = cs[2 * i + 1];
                        ans_store<KIND>(a.out, orow + base + i, fsub_mul(x0, co, y0, sn));
                        ans_store<KIND>(a.out, orow + c, DKV_FADD(DKV_FMUL(x0, sn), DKV_FMUL(y0, co)));
                    }
                } else {
                    ans_store<KIND>(a.out, orow + c, v);
                }
            }
        }
    }
    if (st.bad || (r_stop == r1 && (st.x != 65536u || st.w != st.w_end))) atomicMin(a.bad, (unsigned long long)si);
}

typedef void (*AnsDecodeFn)(AnsArgs);
template <int KIND>
AnsDecodeFn pick_ans_mode(int mode) {
    return mode == 1 ? k_decode_ans<KIND, 1> : mode == 2 ? k_decode_ans<KIND, 2> : k_decode_ans<KIND, 0>;
}

/* ---- host side ------------------------------------------------------------------------------- */

thread_local char g_err[512] = "no error";
int g_decode_vpl = 8;

int fail(int code, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return code;
}

int check_rt(cudaError_t e, const char* what) {
    if (e != cudaSuccess) return fail(DKV_ERR_RUNTIME, "%s: %s", what, cudaGetErrorString(e));
    return DKV_OK;
}

int check_launch(const char* what) {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fail(DKV_ERR_LAUNCH, "%s: %s", what, cudaGetErrorString(e));
    return DKV_OK;
}

bool aligned(const void* p, size_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

int grid_for(int64_t lanes, int threads, dim3* grid) {
    const int64_t blocks = (lanes + threads - 1) / threads;
    if (blocks > 0x7fffffffLL) return fail(DKV_ERR_INVALID_ARGUMENT, "problem too large for one launch (%lld blocks)", (long long)blocks);
    *grid = dim3((unsigned)(blocks > 0 ? blocks : 1));
    return DKV_OK;
}

int check_common(int64_t n_rows, int64_t n_values, int kind, const char* fn) {
    if (n_rows < 0) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: n_rows must be >= 0, found %lld", fn, (long long)n_rows);
    if (n_values <= 0 || n_values % QK)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: n_values must be a positive multiple of 32, found %lld", fn, (long long)n_values);
    if (kind < 0 || kind > 2) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: kind must be 0 (f16), 1 (bf16) or 2 (f32), found %d", fn, kind);
    return DKV_OK;
}

int check_rotation(int rotation, int64_t n_values, const char* fn) {
    if (rotation != 0 && rotation != 16 && rotation != 64 && rotation != 256)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: rotation must be 0, 16, 64 or 256, found %d", fn, rotation);
    if (rotation && n_values % rotation)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: n_values %lld is not a multiple of the rotation %d", fn, (long long)n_values, rotation);
    return DKV_OK;
}

#define DKV_REQUIRE_ALIGNED(p, a, fn, name)                                                              \
    do {                                                                                                 \
        if (!aligned((p), (a))) return fail(DKV_ERR_MISALIGNED, "%s: %s must be %d-byte aligned", fn, name, (int)(a)); \
    } while (0)

#define DKV_REQUIRE_PTR(p, fn, name)                                                                     \
    do {                                                                                                 \
        if (!(p)) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn, name);                    \
    } while (0)

/* Kernel selection tables. */
typedef void (*ConvertFn)(const void*, int64_t, void*);
template <int VPL>
ConvertFn pick_convert(int src, int dst) {
    if (src == 0 && dst == 1) return k_convert<0, 1, VPL>;
    if (src == 0 && dst == 2) return k_convert<0, 2, VPL>;
    if (src == 1 && dst == 0) return k_convert<1, 0, VPL>;
    if (src == 2 && dst == 0) return k_convert<2, 0, VPL>;
    return nullptr;
}

typedef void (*BlockDecodeFn)(const uint8_t*, int64_t, int64_t, void*);
template <int VPL>
BlockDecodeFn pick_q4(int kind) {
    return kind == 0 ? k_decode_q4_0<0, VPL> : kind == 1 ? k_decode_q4_0<1, VPL> : k_decode_q4_0<2, VPL>;
}
template <int VPL>
BlockDecodeFn pick_q8(int kind) {
    return kind == 0 ? k_decode_q8_0<0, VPL> : kind == 1 ? k_decode_q8_0<1, VPL> : k_decode_q8_0<2, VPL>;
}

typedef void (*DeltaDecodeFn)(const void*, const uint8_t*, const uint8_t*, int64_t, int64_t, int64_t, int64_t,
                              int64_t, int64_t, void*);
template <int KIND, int VPL, bool MODES>
DeltaDecodeFn pick_delta_rot(int rot) {
    switch (rot) {
        case 16: return k_decode_delta<KIND, VPL, 16, MODES>;
        case 64: return k_decode_delta<KIND, VPL, 64, MODES>;
        case 256: return k_decode_delta<KIND, VPL, 256, MODES>;
        default: return k_decode_delta<KIND, VPL, 0, MODES>;
    }
}
template <int VPL>
DeltaDecodeFn pick_delta(int kind, int rot, bool modes) {
    if (kind == 0) return modes ? pick_delta_rot<0, VPL, true>(rot) : pick_delta_rot<0, VPL, false>(rot);
    if (kind == 1) return modes ? pick_delta_rot<1, VPL, true>(rot) : pick_delta_rot<1, VPL, false>(rot);
    return modes ? pick_delta_rot<2, VPL, true>(rot) : pick_delta_rot<2, VPL, false>(rot);
}

typedef void (*DeltaEncodeFn)(const void*, int64_t, int64_t, int64_t, int, int, int64_t, int64_t, void*, uint8_t*,
                              uint8_t*);
template <int KIND>
DeltaEncodeFn pick_encode_rot(int rot) {
    switch (rot) {
        case 16: return k_encode_delta<KIND, 16>;
        case 64: return k_encode_delta<KIND, 64>;
        case 256: return k_encode_delta<KIND, 256>;
        default: return k_encode_delta<KIND, 0>;
    }
}

}  // namespace

/* ======================================================================================= C ABI */

extern "C" {

int dkv_abi_version(void) { return DKV_ABI_VERSION; }
const char* dkv_last_error(void) { return g_err; }

const char* dkv_backend(void) {
#if defined(DKV_EMU)
    return "emulator";
#elif defined(__HIPCC__) || defined(__HIP__)
    return "hip";
#else
    return "cuda";
#endif
}

int dkv_device_count(int* count) {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        *count = 0;
        (void)cudaGetLastError();
        return fail(DKV_ERR_NO_DEVICE, "no GPU: %s", cudaGetErrorString(e));
    }
    *count = n;
    return n > 0 ? DKV_OK : fail(DKV_ERR_NO_DEVICE, "no GPU visible");
}

int dkv_device_name(int device, char* buf, size_t buf_len) {
    cudaDeviceProp prop;
    int rc = check_rt(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    if (rc) return rc;
    snprintf(buf, buf_len, "%s", prop.name);
    return DKV_OK;
}

int dkv_set_option(const char* name, int64_t value) {
    if (name && strcmp(name, "decode_vpl") == 0) {
        if (value != 8 && value != 16) return fail(DKV_ERR_INVALID_ARGUMENT, "decode_vpl must be 8 or 16, found %lld", (long long)value);
        g_decode_vpl = (int)value;
        return DKV_OK;
    }
    return fail(DKV_ERR_INVALID_ARGUMENT, "unknown option %s", name ? name : "(null)");
}

int dkv_malloc(void** ptr, size_t bytes) {
    *ptr = nullptr;
    return check_rt(cudaMalloc(ptr, bytes ? bytes : 1), "cudaMalloc");
}
int dkv_free(void* ptr) { return ptr ? check_rt(cudaFree(ptr), "cudaFree") : DKV_OK; }
int dkv_memcpy_h2d(void* dst, const void* src, size_t bytes) {
    return bytes ? check_rt(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D") : DKV_OK;
}
int dkv_memcpy_d2h(void* dst, const void* src, size_t bytes) {
    return bytes ? check_rt(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H") : DKV_OK;
}
int dkv_memcpy_d2d(void* dst, const void* src, size_t bytes, void* stream) {
    return bytes ? check_rt(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, (dkvStream)stream), "cudaMemcpyAsync D2D")
                 : DKV_OK;
}
int dkv_memset(void* dst, int value, size_t bytes, void* stream) {
    return bytes ? check_rt(cudaMemsetAsync(dst, value, bytes, (dkvStream)stream), "cudaMemsetAsync") : DKV_OK;
}
int dkv_synchronize(void* stream) {
    if (stream) return check_rt(cudaStreamSynchronize((dkvStream)stream), "cudaStreamSynchronize");
    return check_rt(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}
int dkv_mem_info(size_t* free_bytes, size_t* total_bytes) {
    return check_rt(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo");
}
int dkv_event_create(void** event) {
    dkvEvent e;
    int rc = check_rt(cudaEventCreate(&e), "cudaEventCreate");
    *event = rc ? nullptr : (void*)e;
    return rc;
}
int dkv_event_destroy(void* event) { return check_rt(cudaEventDestroy((dkvEvent)event), "cudaEventDestroy"); }
int dkv_event_record(void* event, void* stream) {
    return check_rt(cudaEventRecord((dkvEvent)event, (dkvStream)stream), "cudaEventRecord");
}
int dkv_event_elapsed_ms(void* start, void* stop, float* ms) {
    int rc = check_rt(cudaEventSynchronize((dkvEvent)stop), "cudaEventSynchronize");
    if (rc) return rc;
    return check_rt(cudaEventElapsedTime(ms, (dkvEvent)start, (dkvEvent)stop), "cudaEventElapsedTime");
}

int dkv_fill_random(void* dst, int kind, int64_t n_rows, int64_t n_values, uint64_t seed, float scale, void* stream) {
    const char* fn = "dkv_fill_random";
    if (n_rows < 0 || n_values <= 0 || kind < 0 || kind > 2) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: bad shape or kind", fn);
    DKV_REQUIRE_PTR(dst, fn, "dst");
    if (n_rows == 0) return DKV_OK;
    dim3 grid;
    int rc = grid_for(n_rows * n_values, THREADS, &grid);
    if (rc) return rc;
    const dkvStream s = (dkvStream)stream;
    if (kind == 0) DKV_LAUNCH(k_fill_random<0>, grid, dim3(THREADS), s, dst, n_rows, n_values, seed, scale);
    else if (kind == 1) DKV_LAUNCH(k_fill_random<1>, grid, dim3(THREADS), s, dst, n_rows, n_values, seed, scale);
    else DKV_LAUNCH(k_fill_random<2>, grid, dim3(THREADS), s, dst, n_rows, n_values, seed, scale);
    return check_launch(fn);
}

int dkv_find_nonfinite(const void* src, int kind, int64_t n_elems, int64_t* first_bad) {
    const char* fn = "dkv_find_nonfinite";
    *first_bad = -1;
    if (kind < 0 || kind > 2 || n_elems < 0) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: bad kind or size", fn);
    if (n_elems == 0) return DKV_OK;
    DKV_REQUIRE_PTR(src, fn, "src");
    dim3 grid;
    int rc = grid_for(n_elems, THREADS, &grid);
    if (rc) return rc;
    void* d_first = nullptr;
    if ((rc = dkv_malloc(&d_first, sizeof(unsigned long long)))) return rc;
    unsigned long long h_first = ~0ull;
    rc = dkv_memcpy_h2d(d_first, &h_first, sizeof h_first);
    if (!rc) {
        unsigned long long* p = static_cast<unsigned long long*>(d_first);
        if (kind == 0) DKV_LAUNCH(k_find_nonfinite<0>, grid, dim3(THREADS), (dkvStream)0, src, n_elems, p);
        else if (kind == 1) DKV_LAUNCH(k_find_nonfinite<1>, grid, dim3(THREADS), (dkvStream)0, src, n_elems, p);
        else DKV_LAUNCH(k_find_nonfinite<2>, grid, dim3(THREADS), (dkvStream)0, src, n_elems, p);
        rc = check_launch(fn);
    }
    if (!rc) rc = dkv_memcpy_d2h(&h_first, d_first, sizeof h_first);
    dkv_free(d_first);
    if (!rc && h_first != ~0ull) *first_bad = (int64_t)h_first;
    return rc;
}

/* ---- decode ---- */

int dkv_decode_f16(const void* data, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream) {
    const char* fn = "dkv_decode_f16";
    int rc = check_common(n_rows, n_values, out_kind, fn);
    if (rc) return rc;
    if (n_rows == 0) return DKV_OK;
    DKV_REQUIRE_PTR(data, fn, "data");
    DKV_REQUIRE_PTR(out, fn, "out");
    if (out_kind == DKV_KIND_F16) return dkv_memcpy_d2d(out, data, (size_t)(n_rows * n_values * 2), stream);
    DKV_REQUIRE_ALIGNED(data, 16, fn, "data");
    DKV_REQUIRE_ALIGNED(out, 16, fn, "out");
    const int64_t lanes = n_rows * n_values / 8;
    dim3 grid;
    if ((rc = grid_for(lanes, THREADS, &grid))) return rc;
    ConvertFn k = pick_convert<8>(DKV_KIND_F16, out_kind);
    DKV_LAUNCH(k, grid, dim3(THREADS), (dkvStream)stream, data, lanes, out);
    return check_launch(fn);
}

static int decode_blocks(const void* blocks, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream,
                         bool q8, const char* fn) {
    int rc = check_common(n_rows, n_values, out_kind, fn);
    if (rc) return rc;
    if (n_rows == 0) return DKV_OK;
    DKV_REQUIRE_PTR(blocks, fn, "blocks");
    DKV_REQUIRE_PTR(out, fn, "out");
    DKV_REQUIRE_ALIGNED(blocks, 2, fn, "blocks");
    DKV_REQUIRE_ALIGNED(out, 16, fn, "out");
    const int vpl = g_decode_vpl;
    const int64_t lanes = n_rows * n_values / vpl;
    dim3 grid;
    if ((rc = grid_for(lanes, THREADS, &grid))) return rc;
    BlockDecodeFn k = q8 ? (vpl == 16 ? pick_q8<16>(out_kind) : pick_q8<8>(out_kind))
                         : (vpl == 16 ? pick_q4<16>(out_kind) : pick_q4<8>(out_kind));
    DKV_LAUNCH(k, grid, dim3(THREADS), (dkvStream)stream, static_cast<const uint8_t*>(blocks), n_values, lanes, out);
    return check_launch(fn);
}

int dkv_decode_q8_0(const void* blocks, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream) {
    return decode_blocks(blocks, n_rows, n_values, out_kind, out, stream, true, "dkv_decode_q8_0");
}
int dkv_decode_q4_0(const void* blocks, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream) {
    return decode_blocks(blocks, n_rows, n_values, out_kind, out, stream, false, "dkv_decode_q4_0");
}

int dkv_decode_delta(const void* keys, const void* q4, const void* modes, int has_modes, int64_t n_rows,
                     int64_t n_values, int64_t interval, int rotation, int kind, int64_t row_lo, int64_t row_hi,
                     void* out, void* stream) {
    const char* fn = "dkv_decode_delta";
    int rc = check_common(n_rows, n_values, kind, fn);
    if (rc) return rc;
    if ((rc = check_rotation(rotation, n_values, fn))) return rc;
    if (interval < 1 || interval > (1 << 30))
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: interval must be 1..2^30, found %lld", fn, (long long)interval);
    if (row_lo < 0 || row_lo > row_hi || row_hi > n_rows)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: need 0 <= row_lo <= row_hi <= n_rows (%lld), found [%lld, %lld)", fn,
                    (long long)n_rows, (long long)row_lo, (long long)row_hi);
    if (row_hi == row_lo) return DKV_OK;
    const int64_t n_keys = (n_rows + interval - 1) / interval;
    const int64_t n_deltas = n_rows - n_keys;
    DKV_REQUIRE_PTR(keys, fn, "keys");
    DKV_REQUIRE_PTR(out, fn, "out");
    DKV_REQUIRE_ALIGNED(keys, 16, fn, "keys");
    DKV_REQUIRE_ALIGNED(out, 16, fn, "out");
    if (n_deltas > 0) {
        DKV_REQUIRE_PTR(q4, fn, "q4");
        DKV_REQUIRE_ALIGNED(q4, 2, fn, "q4");
        if (has_modes) DKV_REQUIRE_PTR(modes, fn, "modes");
    }
    const int vpl = g_decode_vpl;
    const int64_t first_chunk = row_lo / interval;
    const int64_t last_chunk = (row_hi + interval - 1) / interval;
    const int64_t lanes = (last_chunk - first_chunk) * (n_values / vpl);
    dim3 grid;
    if ((rc = grid_for(lanes, THREADS, &grid))) return rc;
    DeltaDecodeFn k = vpl == 16 ? pick_delta<16>(kind, rotation, has_modes != 0) : pick_delta<8>(kind, rotation, has_modes != 0);
    DKV_LAUNCH(k, grid, dim3(THREADS), (dkvStream)stream, keys, static_cast<const uint8_t*>(q4),
               static_cast<const uint8_t*>(modes), n_values, interval, row_lo, row_hi, first_chunk, lanes, out);
    return check_launch(fn);
}

/* ---- encode ---- */

int dkv_encode_f16(const void* src, int kind, int64_t n_rows, int64_t n_values, void* out, void* stream) {
    const char* fn = "dkv_encode_f16";
    int rc = check_common(n_rows, n_values, kind, fn);
    if (rc) return rc;
    if (n_rows == 0) return DKV_OK;
    DKV_REQUIRE_PTR(src, fn, "src");
    DKV_REQUIRE_PTR(out, fn, "out");
    if (kind == DKV_KIND_F16) return dkv_memcpy_d2d(out, src, (size_t)(n_rows * n_values * 2), stream);
    DKV_REQUIRE_ALIGNED(src, 16, fn, "src");
    DKV_REQUIRE_ALIGNED(out, 16, fn, "out");
    const int64_t lanes = n_rows * n_values / 8;
    dim3 grid;
    if ((rc = grid_for(lanes, THREADS, &grid))) return rc;
    ConvertFn k = pick_convert<8>(kind, DKV_KIND_F16);
    DKV_LAUNCH(k, grid, dim3(THREADS), (dkvStream)stream, src, lanes, out);
    return check_launch(fn);
}

static int encode_blocks(const void* src, int kind, int64_t n_rows, int64_t n_values, void* blocks, void* stream,
                         bool q8, const char* fn) {
    int rc = check_common(n_rows, n_values, kind, fn);
    if (rc) return rc;
    if (n_rows == 0) return DKV_OK;
    DKV_REQUIRE_PTR(src, fn, "src");
    DKV_REQUIRE_PTR(blocks, fn, "blocks");
    DKV_REQUIRE_ALIGNED(src, 16, fn, "src");
    DKV_REQUIRE_ALIGNED(blocks, 2, fn, "blocks");
    const int64_t total = n_rows * (n_values / QK);
    dim3 grid;
    if ((rc = grid_for(total, STAGE_THREADS, &grid))) return rc;
    const dkvStream s = (dkvStream)stream;
    uint8_t* out = static_cast<uint8_t*>(blocks);
    const dim3 block(STAGE_THREADS);
    if (q8) {
        if (kind == 0) DKV_LAUNCH(k_encode_q8_0<0>, grid, block, s, src, n_values, total, out);
        else if (kind == 1) DKV_LAUNCH(k_encode_q8_0<1>, grid, block, s, src, n_values, total, out);
        else DKV_LAUNCH(k_encode_q8_0<2>, grid, block, s, src, n_values, total, out);
    } else {
        if (kind == 0) DKV_LAUNCH(k_encode_q4_0<0>, grid, block, s, src, n_values, total, out);
        else if (kind == 1) DKV_LAUNCH(k_encode_q4_0<1>, grid, block, s, src, n_values, total, out);
        else DKV_LAUNCH(k_encode_q4_0<2>, grid, block, s, src, n_values, total, out);
    }
    return check_launch(fn);
}

int dkv_encode_q8_0(const void* src, int kind, int64_t n_rows, int64_t n_values, void* blocks, void* stream) {
    return encode_blocks(src, kind, n_rows, n_values, blocks, stream, true, "dkv_encode_q8_0");
}
int dkv_encode_q4_0(const void* src, int kind, int64_t n_rows, int64_t n_values, void* blocks, void* stream) {
    return encode_blocks(src, kind, n_rows, n_values, blocks, stream, false, "dkv_encode_q4_0");
}

int dkv_encode_delta(const void* src, int kind, int64_t n_rows, int64_t n_values, int64_t interval, int rotation,
                     int adaptive, int search, void* keys, void* q4, void* modes, void* stream) {
    const char* fn = "dkv_encode_delta";
    int rc = check_common(n_rows, n_values, kind, fn);
    if (rc) return rc;
    if ((rc = check_rotation(rotation, n_values, fn))) return rc;
    if (interval < 1 || interval > (1 << 30))
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: interval must be 1..2^30, found %lld", fn, (long long)interval);
    if (n_rows == 0) return DKV_OK;
    const int64_t n_keys = (n_rows + interval - 1) / interval;
    const int64_t n_deltas = n_rows - n_keys;
    DKV_REQUIRE_PTR(src, fn, "src");
    DKV_REQUIRE_PTR(keys, fn, "keys");
    DKV_REQUIRE_ALIGNED(src, 16, fn, "src");
    DKV_REQUIRE_ALIGNED(keys, 16, fn, "keys");
    if (n_deltas > 0) {
        DKV_REQUIRE_PTR(q4, fn, "q4");
        DKV_REQUIRE_ALIGNED(q4, 2, fn, "q4");
        if (adaptive) DKV_REQUIRE_PTR(modes, fn, "modes");
    }
    const int64_t nb = n_values / QK;
    const int64_t nb_pad = adaptive ? (nb + 7) / 8 * 8 : nb;  // mode bytes gathered by aligned lane groups of 8
    const int64_t lanes = n_keys * nb_pad;
    dim3 grid;
    if ((rc = grid_for(lanes, ENC_THREADS, &grid))) return rc;
    DeltaEncodeFn k = kind == 0 ? pick_encode_rot<0>(rotation) : kind == 1 ? pick_encode_rot<1>(rotation) : pick_encode_rot<2>(rotation);
    DKV_LAUNCH(k, grid, dim3(ENC_THREADS), (dkvStream)stream, src, n_rows, n_values, interval, adaptive ? 1 : 0,
               search ? 1 : 0, nb_pad, lanes, keys, static_cast<uint8_t*>(q4), static_cast<uint8_t*>(modes));
    return check_launch(fn);
}

/* ---- dkv-ans ---- */

int dkv_rope_table(const void* positions, int64_t n_rows, const void* thetas, int64_t n_pairs, void* table, void* stream) {
    const char* fn = "dkv_rope_table";
    if (n_rows < 0 || n_pairs < 0) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: n_rows and n_pairs must be >= 0", fn);
    if (n_rows == 0 || n_pairs == 0) return DKV_OK;
    DKV_REQUIRE_PTR(positions, fn, "positions");
    DKV_REQUIRE_PTR(thetas, fn, "thetas");
    DKV_REQUIRE_PTR(table, fn, "table");
    DKV_REQUIRE_ALIGNED(positions, 4, fn, "positions");
    DKV_REQUIRE_ALIGNED(thetas, 4, fn, "thetas");
    DKV_REQUIRE_ALIGNED(table, 4, fn, "table");
    dim3 grid;
    int rc = grid_for(n_rows * n_pairs, THREADS, &grid);
    if (rc) return rc;
    DKV_LAUNCH(k_rope_table, grid, dim3(THREADS), (dkvStream)stream, static_cast<const int32_t*>(positions), n_rows,
               static_cast<const float*>(thetas), n_pairs, static_cast<float*>(table));
    return check_launch(fn);
}

int dkv_decode_ans(const void* words, const void* starts, int64_t n_words, int64_t n_rows, int64_t stream_rows,
                   const void* classes, const void* shifts, const void* freqs, int n_classes, float step,
                   const void* means, int64_t width, int kind, const void* table, int64_t head_dim, int64_t n_rot,
                   int mode, int64_t row_lo, int64_t row_hi, void* out, void* bad_stream, void* stream) {
    const char* fn = "dkv_decode_ans";
    if (n_rows < 0 || width <= 0 || n_words < 0)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: need n_rows >= 0, width > 0 and n_words >= 0", fn);
    if (kind < 0 || kind > 2) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: kind must be 0, 1 or 2, found %d", fn, kind);
    if (stream_rows < 1) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: stream_rows must be >= 1", fn);
    if (n_classes < 1 || n_classes > ANS_MAX_CLASSES)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: n_classes must be 1..%d, found %d", fn, ANS_MAX_CLASSES, n_classes);
    if (mode < 0 || mode > 2) return fail(DKV_ERR_INVALID_ARGUMENT, "%s: rope mode must be 0, 1 or 2, found %d", fn, mode);
    if (mode) {
        if (head_dim < 2 || width % head_dim || n_rot < 2 || n_rot > head_dim || n_rot % 2)
            return fail(DKV_ERR_INVALID_ARGUMENT, "%s: rope needs an even n_rot within head_dim dividing width "
                        "(n_rot %lld, head_dim %lld, width %lld)", fn, (long long)n_rot, (long long)head_dim, (long long)width);
        if (mode == 2 && n_rot > 2 * ANS_MAX_HALF)
            return fail(DKV_ERR_INVALID_ARGUMENT, "%s: neox rope with n_rot %lld: at most %d", fn, (long long)n_rot, 2 * ANS_MAX_HALF);
    }
    if (row_lo < 0 || row_lo > row_hi || row_hi > n_rows)
        return fail(DKV_ERR_INVALID_ARGUMENT, "%s: need 0 <= row_lo <= row_hi <= n_rows (%lld), found [%lld, %lld)", fn,
                    (long long)n_rows, (long long)row_lo, (long long)row_hi);
    DKV_REQUIRE_PTR(bad_stream, fn, "bad_stream");
    DKV_REQUIRE_ALIGNED(bad_stream, 8, fn, "bad_stream");
    int rc = dkv_memset(bad_stream, 0xff, sizeof(unsigned long long), stream);
    if (rc || row_hi == row_lo) return rc;
    DKV_REQUIRE_PTR(words, fn, "words");
    DKV_REQUIRE_PTR(starts, fn, "starts");
    DKV_REQUIRE_PTR(classes, fn, "classes");
    DKV_REQUIRE_PTR(shifts, fn, "shifts");
    DKV_REQUIRE_PTR(freqs, fn, "freqs");
    DKV_REQUIRE_PTR(means, fn, "means");
    DKV_REQUIRE_PTR(out, fn, "out");
    if (mode) DKV_REQUIRE_PTR(table, fn, "table");
    DKV_REQUIRE_ALIGNED(words, 2, fn, "words");
    DKV_REQUIRE_ALIGNED(starts, 4, fn, "starts");
    DKV_REQUIRE_ALIGNED(freqs, 2, fn, "freqs");
    DKV_REQUIRE_ALIGNED(means, 4, fn, "means");
    DKV_REQUIRE_ALIGNED(out, kind == DKV_KIND_F32 ? 4 : 2, fn, "out");
    if (mode) DKV_REQUIRE_ALIGNED(table, 4, fn, "table");
    AnsArgs a;
    a.words = static_cast<const uint16_t*>(words);
    a.starts = static_cast<const uint32_t*>(starts);
    a.n_words = n_words;
    a.n_streams = (n_rows + stream_rows - 1) / stream_rows;
    a.n_rows = n_rows;
    a.stream_rows = stream_rows;
    a.classes = static_cast<const uint8_t*>(classes);
    a.shifts = static_cast<const uint8_t*>(shifts);
    a.freqs = static_cast<const uint16_t*>(freqs);
    a.n_classes = n_classes;
    a.step = step;
    a.means = static_cast<const float*>(means);
    a.width = width;
    a.table = static_cast<const float*>(table);
    a.head_dim = head_dim;
    a.n_rot = mode ? n_rot : 0;
    a.row_lo = row_lo;
    a.row_hi = row_hi;
    a.first_stream = row_lo / stream_rows;
    a.n_threads = (row_hi + stream_rows - 1) / stream_rows - a.first_stream;
    a.out = out;
    a.bad = static_cast<unsigned long long*>(bad_stream);
    dim3 grid;
    if ((rc = grid_for(a.n_threads, ANS_THREADS, &grid))) return rc;
    AnsDecodeFn k = kind == 0 ? pick_ans_mode<0>(mode) : kind == 1 ? pick_ans_mode<1>(mode) : pick_ans_mode<2>(mode);
    DKV_LAUNCH(k, grid, dim3(ANS_THREADS), (dkvStream)stream, a);
    return check_launch(fn);
}

int dkv_stream_create(void** stream) {
    dkvStream s;
    int rc = check_rt(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    *stream = rc ? nullptr : (void*)s;
    return rc;
}
int dkv_stream_destroy(void* stream) { return check_rt(cudaStreamDestroy((dkvStream)stream), "cudaStreamDestroy"); }

}  // extern "C"

