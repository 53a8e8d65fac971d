/* deltakv GPU kernels: the C ABI.
 *
 * One source (deltakv_kernels.cu) builds with nvcc (CUDA, sm_80/sm_90) and hipcc (AMD gfx906/gfx90a/
 * gfx942). Every function returns DKV_OK (0) or a DKV_ERR_* code and never aborts; dkv_last_error()
 * gives a message for the last failure of the calling thread.
 *
 * Element "kinds" (the cache's element type; values travel as bit patterns):
 *   DKV_KIND_F16 = 0 (uint16 bits), DKV_KIND_BF16 = 1 (uint16 bits), DKV_KIND_F32 = 2 (uint32 bits).
 *
 * Layouts are the ones of deltakv_format/codecs (SPEC.md): rows of n_values values; Q4_0 blocks are
 * ggml's (f16 d + 16 bytes, value j in the low nibble of qs[j], value j+16 in the high nibble),
 * Q8_0 blocks ggml's (f16 d + 32 int8). A delta-coded segment of n_rows rows with keyframe interval
 * N has ceil(n_rows / N) keyframe rows (`keys`, in the source kind), n_rows - ceil(n_rows / N)
 * Q4_0 rows (`q4`) and, for dkv-q4, as many mode rows of ceil(n_values / 256) bytes (`modes`, one
 * bit per 32-value block, LSB first, 1 = inter).
 *
 * Pointers given to the decode/encode functions are DEVICE pointers; the work is queued on `stream`
 * (a cudaStream_t / hipStream_t, NULL for the default stream) and the functions return without
 * waiting. Requirements: n_values is a positive multiple of 32 (and of the rotation size when a
 * rotation is used); element arrays (keys, source rows, f16/bf16/f32 outputs) are 16-byte aligned;
 * block arrays (q4, q8) are 2-byte aligned. Encoders expect finite values within +-65504 (the codec
 * classes check that on the host; dkv_find_nonfinite does it on the device).
 */
#ifndef DELTAKV_KERNELS_H
#define DELTAKV_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DKV_ABI_VERSION 1

enum {
    DKV_OK = 0,
    DKV_ERR_INVALID_ARGUMENT = 1, /* a size, kind, rotation or range out of its domain */
    DKV_ERR_MISALIGNED = 2,       /* a pointer does not have the alignment stated above */
    DKV_ERR_LAUNCH = 3,           /* a kernel launch failed (see dkv_last_error) */
    DKV_ERR_RUNTIME = 4,          /* a CUDA/HIP runtime call failed (allocation, copy, sync) */
    DKV_ERR_NO_DEVICE = 5         /* no GPU is visible */
};

enum { DKV_KIND_F16 = 0, DKV_KIND_BF16 = 1, DKV_KIND_F32 = 2 };

/* ---- information ------------------------------------------------------------------------ */
int dkv_abi_version(void);
const char* dkv_last_error(void);
const char* dkv_backend(void); /* "cuda", "hip" or "emulator" */
int dkv_device_count(int* count);
int dkv_device_name(int device, char* buf, size_t buf_len);
/* Tuning knob (benchmarks): "decode_vpl" = values per thread in the delta/plain decoders (8 or 16). */
int dkv_set_option(const char* name, int64_t value);

/* ---- memory and timing helpers (host-callable) ------------------------------------------ */
int dkv_malloc(void** ptr, size_t bytes);
int dkv_free(void* ptr);
int dkv_memcpy_h2d(void* dst, const void* src, size_t bytes);
int dkv_memcpy_d2h(void* dst, const void* src, size_t bytes);
int dkv_memcpy_d2d(void* dst, const void* src, size_t bytes, void* stream); /* async on stream */
int dkv_memset(void* dst, int value, size_t bytes, void* stream);
int dkv_synchronize(void* stream); /* waits for stream (NULL: the whole device) */
int dkv_mem_info(size_t* free_bytes, size_t* total_bytes);
int dkv_event_create(void** event);
int dkv_event_destroy(void* event);
int dkv_event_record(void* event, void* stream);
int dkv_event_elapsed_ms(void* start, void* stop, float* ms); /* waits for stop */
/* Fill n elements of `kind` at dst with reproducible pseudo-random finite values (benchmarks):
 * a smooth per-column random walk over rows plus noise, values of magnitude ~scale. */
int dkv_fill_random(void* dst, int kind, int64_t n_rows, int64_t n_values, uint64_t seed, float scale, void* stream);
/* Index (row-major element index) of the first value that is not finite or beyond +-65504, or -1.
 * Synchronous. */
int dkv_find_nonfinite(const void* src, int kind, int64_t n_elems, int64_t* first_bad);

/* ---- decode (parts -> rows of `kind`) ------------------------------------------------------ */
/* f16 codec: data (n_rows x n_values f16 bits) -> out (n_rows x n_values of out_kind). */
int dkv_decode_f16(const void* data, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream);
/* q8_0 / q4_0 codecs: ggml blocks (n_rows x n_values/32 blocks) -> out. */
int dkv_decode_q8_0(const void* blocks, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream);
int dkv_decode_q4_0(const void* blocks, int64_t n_rows, int64_t n_values, int out_kind, void* out, void* stream);
/* delta-q4_0 (has_modes = 0) and dkv-q4 (has_modes = 1): decode local rows [row_lo, row_hi) of one
 * segment of n_rows rows into out ((row_hi - row_lo) x n_values of `kind`, the source kind).
 * rotation: 0, 16, 64 or 256 (normalised Walsh-Hadamard size). Bit-exact with decode_delta of
 * deltakv_format/codecs/kernels.py. */
int dkv_decode_delta(const void* keys, const void* q4, const void* modes, int has_modes, int64_t n_rows,
                     int64_t n_values, int64_t interval, int rotation, int kind, int64_t row_lo, int64_t row_hi,
                     void* out, void* stream);

/* ---- encode (rows of `kind` -> parts) ------------------------------------------------------ */
/* f16 codec: src (n_rows x n_values of kind) -> f16 bits, round to nearest even, saturating. */
int dkv_encode_f16(const void* src, int kind, int64_t n_rows, int64_t n_values, void* out, void* stream);
/* q8_0 / q4_0: ggml quantize_row_q8_0_ref / quantize_row_q4_0_ref, bit for bit. */
int dkv_encode_q8_0(const void* src, int kind, int64_t n_rows, int64_t n_values, void* blocks, void* stream);
int dkv_encode_q4_0(const void* src, int kind, int64_t n_rows, int64_t n_values, void* blocks, void* stream);
/* Closed-loop delta encoder, bit-exact with encode_delta of kernels.py:
 *   delta-q4_0: adaptive = 0, search = 0 (ggml's Q4_0 rule on the residual); modes may be NULL;
 *   dkv-q4:     adaptive = 1, search = 1 (per-block intra/inter choice, searched scales).
 * keys: ceil(n_rows/interval) x n_values of kind; q4: (n_rows - ceil(n_rows/interval)) x n_values/32
 * blocks; modes (adaptive only): as many rows of ceil(n_values/256) bytes. */
int dkv_encode_delta(const void* src, int kind, int64_t n_rows, int64_t n_values, int64_t interval, int rotation,
                     int adaptive, int search, void* keys, void* q4, void* modes, void* stream);

/* ---- dkv-ans (SPEC.md 6.5) ----------------------------------------------------------------- */
/* cos/sin of rope_cos_sin (deltakv_format/codecs/ans.py, f64, bit-exact) for n_rows positions (i32)
 * and n_pairs thetas (f32): table = n_rows x n_pairs x 2 f32 (cos, sin). */
int dkv_rope_table(const void* positions, int64_t n_rows, const void* thetas, int64_t n_pairs, void* table, void* stream);
/* Decode coded rows [row_lo, row_hi) of one dkv-ans segment (ans.decode_streams, bit for bit) into
 * out ((row_hi - row_lo) x width of kind). words: the u16 rANS words (n_words); starts: u32 word
 * offset of each of ceil(n_rows / stream_rows) streams; classes: u8 [width]; shifts: u8 [n_classes];
 * freqs: u16 [n_classes][32], each class adding up to 4096 (checked by the host: parse_head);
 * means: f32 [width]; mode 0 (none), 1 (norm), 2 (neox, n_rot <= 256) with table = dkv_rope_table of
 * the rows [row_lo, row_hi) (unused for mode 0). bad_stream: device int64, set to the lowest corrupt
 * stream index or -1 (a stream that runs out of words, or, read to its end, does not end in state
 * 2^16 with all its words used). One thread per stream. */
int dkv_decode_ans(const void* words, const void* starts, int64_t n_words, int64_t n_rows, int64_t stream_rows,
                   const void* classes, const void* shifts, const void* freqs, int n_classes, float step,
                   const void* means, int64_t width, int kind, const void* table, int64_t head_dim, int64_t n_rot,
                   int mode, int64_t row_lo, int64_t row_hi, void* out, void* bad_stream, void* stream);
/* Streams for concurrent launches (benchmarks): non-blocking CUDA/HIP streams. */
int dkv_stream_create(void** stream);
int dkv_stream_destroy(void* stream);

#ifdef __cplusplus
}
#endif
#endif
