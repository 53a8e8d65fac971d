/* Portability layer for deltakv_kernels.cu: one source for nvcc (CUDA), hipcc (HIP on AMD) and a
 * CPU emulator (DKV_EMU, used only to test the kernels on machines without a GPU).
 *
 * The kernels are written for 32-lane warps. On AMD (64-lane wavefronts) every cross-lane exchange
 * uses width 32, so each half of a wavefront works as one 32-lane warp.
 *
 * Floating point: the decode arithmetic is normative (plain IEEE f32 adds and multiplies, no fused
 * multiply-add, no flush-to-zero). Products that feed an add go through DKV_FMUL / DKV_FADD, which
 * are never contracted on CUDA (__fmul_rn/__fadd_rn); the build flags also forbid contraction
 * (nvcc -fmad=false, hipcc -ffp-contract=off) and clang gets the pragma below.
 */
#pragma once

#include <stdint.h>
#include <stddef.h>

#if defined(DKV_EMU)
/* ---------------------------------------------------------------- CPU emulator */
#include "deltakv_emu.h"
#define DKV_DEV static inline
#define DKV_HW_F16 0
typedef void* dkvStream;
typedef void* dkvEvent;
#define DKV_FADD(a, b) ((float)(a) + (float)(b))
#define DKV_FMUL(a, b) ((float)(a) * (float)(b))
#define DKV_FMA(a, b, c) fmaf((a), (b), (c))
#define DKV_DADD(a, b) ((double)(a) + (double)(b))
#define DKV_DSUB(a, b) ((double)(a) - (double)(b))
#define DKV_DMUL(a, b) ((double)(a) * (double)(b))
#define DKV_LAUNCH(kern, grid, block, stream, ...) \
    do {                                                                  \
        (void)(stream);                                                   \
        dkv_emu::launch((grid), (block), [&]() { kern(__VA_ARGS__); });   \
    } while (0)
#define DKV_SHFL_XOR_U32(v, m) dkv_emu::shfl_xor_u32((v), (m))

#elif defined(__HIPCC__) || defined(__HIP__)
/* ---------------------------------------------------------------- HIP (AMD) */
#include <hip/hip_runtime.h>
#pragma clang fp contract(off)
#define DKV_DEV static __device__ __forceinline__
#define DKV_HW_F16 0 /* integer f16 rounding: bit-exact by construction on every AMD target */
typedef hipStream_t dkvStream;
typedef hipEvent_t dkvEvent;
#define DKV_FADD(a, b) ((float)(a) + (float)(b))
#define DKV_FMUL(a, b) ((float)(a) * (float)(b))
#define DKV_FMA(a, b, c) fmaf((a), (b), (c))
#define DKV_DADD(a, b) ((double)(a) + (double)(b))
#define DKV_DSUB(a, b) ((double)(a) - (double)(b))
#define DKV_DMUL(a, b) ((double)(a) * (double)(b))
#define DKV_LAUNCH(kern, grid, block, stream, ...) \
    hipLaunchKernelGGL(kern, (grid), (block), 0, (stream), __VA_ARGS__)
#define DKV_SHFL_XOR_U32(v, m) ((uint32_t)__shfl_xor((int)(v), (m), 32))
#define cudaSuccess hipSuccess
#define cudaError_t hipError_t
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMemcpy hipMemcpy
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemsetAsync hipMemsetAsync
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define cudaGetLastError hipGetLastError
#define cudaGetErrorString hipGetErrorString
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDevice hipGetDevice
#define cudaSetDevice hipSetDevice
#define cudaDeviceProp hipDeviceProp_t
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaEventCreate hipEventCreate
#define cudaEventDestroy hipEventDestroy
#define cudaEventRecord hipEventRecord
#define cudaEventSynchronize hipEventSynchronize
#define cudaEventElapsedTime hipEventElapsedTime
#define cudaMemGetInfo hipMemGetInfo
#define cudaRuntimeGetVersion hipRuntimeGetVersion
#define cudaDriverGetVersion hipDriverGetVersion
#define cudaStreamCreateWithFlags hipStreamCreateWithFlags
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamNonBlocking hipStreamNonBlocking

#else
/* ---------------------------------------------------------------- CUDA */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#define DKV_DEV static __device__ __forceinline__
#define DKV_HW_F16 1 /* cvt.rn.f16x2.f32 (sm_80+) plus integer fix-ups for overflow and NaN */
typedef cudaStream_t dkvStream;
typedef cudaEvent_t dkvEvent;
#define DKV_FADD(a, b) __fadd_rn((a), (b))
#define DKV_FMUL(a, b) __fmul_rn((a), (b))
#define DKV_FMA(a, b, c) __fmaf_rn((a), (b), (c))
#define DKV_DADD(a, b) __dadd_rn((a), (b))
#define DKV_DSUB(a, b) __dsub_rn((a), (b))
#define DKV_DMUL(a, b) __dmul_rn((a), (b))
#define DKV_LAUNCH(kern, grid, block, stream, ...) kern<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define DKV_SHFL_XOR_U32(v, m) __shfl_xor_sync(0xffffffffu, (uint32_t)(v), (m))
#endif
