/* A small CPU emulator of the CUDA subset that deltakv_kernels.cu uses, for testing the kernels on a
 * machine without a GPU (build with -DDKV_EMU, see runtime/gpu.py build_library(emulate=True)).
 *
 * Each warp runs as 32 fibers (ucontext) on one OS thread. A cross-lane exchange (shuffle) is a
 * barrier of the warp: every live lane must reach it (as the full-mask *_sync intrinsics require),
 * otherwise the emulator reports an error, so divergent shuffles are caught here rather than on the
 * device. Warps and blocks run one after the other. Memory is host memory; floats are IEEE f32 on
 * SSE (compile with -ffp-contract=off). Slow: meant for small test problems only.
 */
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#define __global__
#define __device__
#define __host__
#define __forceinline__
#define __launch_bounds__(...)
#define __shared__ static /* warps run one after the other, so one copy serves every block */

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

static inline uint32_t __float_as_uint(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

namespace dkv_emu {

constexpr int W = 32;
constexpr int MAXV = 32;
constexpr size_t STACK = 256 * 1024;

struct Idx {
    unsigned x, y, z;
};

struct Warp {
    ucontext_t sched;
    ucontext_t ctx[W];
    char* stacks[W] = {};
    bool done[W];
    unsigned seq[W];
    int nvals[2][W];
    uint32_t slot[2][W][MAXV];
    const std::function<void()>* body = nullptr;
    int cur = 0;
};

inline Warp g_warp;
inline unsigned g_tid = 0;
inline dim3 g_bidx, g_bdim, g_gdim;
inline bool g_error = false;
inline char g_error_msg[256] = {0};

inline void fail(const char* msg) {
    if (!g_error) {
        g_error = true;
        snprintf(g_error_msg, sizeof g_error_msg, "%s", msg);
    }
}

inline void entry() {
    Warp& w = g_warp;
    (*w.body)();
    w.done[w.cur] = true;
}

/* Exchange n 32-bit words with lane (lane ^ m); a barrier of the warp. */
inline void exchange(const uint32_t* v, uint32_t* out, int n, int m) {
    Warp& w = g_warp;
    int l = w.cur;
    int buf = w.seq[l] & 1;
    w.seq[l]++;
    w.nvals[buf][l] = n;
    if (n) memcpy(w.slot[buf][l], v, sizeof(uint32_t) * n);
    swapcontext(&w.ctx[l], &w.sched);
    int src = (l ^ m) & (W - 1);
    if (w.nvals[buf][src] != n) fail("emulator: lanes exchanged different value counts");
    if (n) memcpy(out, w.slot[buf][src], sizeof(uint32_t) * n);
}

/* __syncthreads: supported for blocks of one warp (a warp barrier). */
inline void syncthreads() {
    if (g_bdim.x > (unsigned)W) fail("emulator: __syncthreads needs blocks of at most 32 threads");
    exchange(nullptr, nullptr, 0, 0);
}

inline uint32_t shfl_xor_u32(uint32_t v, int m) {
    uint32_t r;
    exchange(&v, &r, 1, m);
    return r;
}

inline void run_warp(const std::function<void()>& body, unsigned base_tid, unsigned n_threads) {
    Warp& w = g_warp;
    w.body = &body;
    for (int l = 0; l < W; ++l) {
        if (!w.stacks[l]) w.stacks[l] = (char*)malloc(STACK);
        w.done[l] = (unsigned)l >= n_threads;
        w.seq[l] = 0;
        w.nvals[0][l] = w.nvals[1][l] = 0;
        if (w.done[l]) continue;
        getcontext(&w.ctx[l]);
        w.ctx[l].uc_stack.ss_sp = w.stacks[l];
        w.ctx[l].uc_stack.ss_size = STACK;
        w.ctx[l].uc_link = &w.sched;
        makecontext(&w.ctx[l], entry, 0);
    }
    for (;;) {
        int live = 0;
        for (int l = 0; l < W; ++l) {
            if (w.done[l]) continue;
            w.cur = l;
            g_tid = base_tid + l;
            swapcontext(&w.sched, &w.ctx[l]);
        }
        int n_done = 0, n_started_done = 0;
        for (int l = 0; l < W; ++l) {
            n_done += w.done[l];
            n_started_done += w.done[l] && (unsigned)l < n_threads;
        }
        live = W - n_done;
        if (live == 0) break;
        if (n_started_done > 0) /* lanes returned while others wait in an exchange: a divergent shuffle */
            fail("emulator: lanes left the kernel while others wait in a warp exchange");
        unsigned s0 = 0;
        bool first = true;
        for (int l = 0; l < W; ++l) {
            if (w.done[l]) continue;
            if (first) { s0 = w.seq[l]; first = false; }
            else if (w.seq[l] != s0) fail("emulator: lanes reached different warp exchanges");
        }
    }
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    g_gdim = grid;
    g_bdim = block;
    unsigned nt = block.x * block.y * block.z;
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_bidx = dim3(bx, 0, 0);
        for (unsigned base = 0; base < nt; base += W) run_warp(body, base, nt - base < (unsigned)W ? nt - base : W);
    }
}

}  // namespace dkv_emu

#define threadIdx (dkv_emu::Idx{dkv_emu::g_tid, 0u, 0u})
#define blockIdx (dkv_emu::Idx{dkv_emu::g_bidx.x, 0u, 0u})
#define blockDim (dkv_emu::Idx{dkv_emu::g_bdim.x, 1u, 1u})
#define gridDim (dkv_emu::Idx{dkv_emu::g_gdim.x, 1u, 1u})

#define __syncthreads() dkv_emu::syncthreads()

static inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
    unsigned long long old = *p;
    if (v < old) *p = v;
    return old;
}

/* ---- the runtime API subset, on host memory ---- */
typedef int cudaError_t;
#define cudaSuccess 0
#define cudaErrorMemoryAllocation 2
#define cudaErrorInvalidValue 1
enum cudaMemcpyKind { cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3 };
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    int multiProcessorCount;
    int major, minor;
};
static inline cudaError_t cudaMalloc(void** p, size_t n) {
    *p = aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaFree(void* p) { free(p); return cudaSuccess; }
static inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) {
    if (n) memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, void*) {
    return cudaMemcpy(d, s, n, k);
}
static inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, void*) {
    memset(d, v, n);
    return cudaSuccess;
}
static inline cudaError_t cudaGetLastError() {
    if (dkv_emu::g_error) { dkv_emu::g_error = false; return 719; }
    return cudaSuccess;
}
static inline const char* cudaGetErrorString(cudaError_t e) {
    return e == 719 ? dkv_emu::g_error_msg : (e ? "emulator error" : "no error");
}
static inline cudaError_t cudaStreamSynchronize(void*) { return cudaGetLastError(); }
static inline cudaError_t cudaDeviceSynchronize() { return cudaGetLastError(); }
static inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
static inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
static inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "deltakv CPU emulator");
    p->multiProcessorCount = 1;
    return cudaSuccess;
}
static inline cudaError_t cudaMemGetInfo(size_t* f, size_t* t) { *f = *t = (size_t)1 << 32; return cudaSuccess; }
static inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 0; return cudaSuccess; }
static inline cudaError_t cudaDriverGetVersion(int* v) { *v = 0; return cudaSuccess; }
#define cudaStreamNonBlocking 1
static inline cudaError_t cudaStreamCreateWithFlags(void** s, unsigned) { *s = new int(0); return cudaSuccess; }
static inline cudaError_t cudaStreamDestroy(void* s) { delete (int*)s; return cudaSuccess; }
#include <chrono>
static inline cudaError_t cudaEventCreate(void** e) { *e = new double(0); return cudaSuccess; }
static inline cudaError_t cudaEventDestroy(void* e) { delete (double*)e; return cudaSuccess; }
static inline cudaError_t cudaEventRecord(void* e, void*) {
    *(double*)e = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
    return cudaSuccess;
}
static inline cudaError_t cudaEventSynchronize(void*) { return cudaSuccess; }
static inline cudaError_t cudaEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(*(double*)b - *(double*)a);
    return cudaSuccess;
}
