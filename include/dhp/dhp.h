/* dhp: constant-time, bit-deterministic FlashAttention for NVIDIA Hopper (sm_90a).
 *
 * Plain C API. Every entry point returns a dhp_status; on failure dhp_last_error() gives one sentence
 * that names the offending argument and what was expected. No exceptions, exit or abort cross this
 * boundary. Tensors are DLPack DLTensors in FlashAttention's layout (batch, seqlen, heads, head_dim)
 * with a contiguous last dimension; work runs on the caller's stream; nothing is allocated on the hot path.
 *
 * Validation happens before anything is launched: on any error, no kernel runs and no output is touched. */
#ifndef DHP_DHP_H_
#define DHP_DHP_H_

#include <stddef.h>
#include <stdint.h>

#include "dhp/dlpack.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Same type as cuda_runtime_api.h's cudaStream_t, so callers may pass theirs without a cast. */
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#if defined(_WIN32)
#define DHP_API __declspec(dllimport)
#else
#define DHP_API __attribute__((visibility("default")))
#endif

typedef enum dhp_status {
  DHP_SUCCESS = 0,
  DHP_ERROR_INVALID_VALUE = 1,  /* a shape, stride, alignment, option or pointer is wrong */
  DHP_ERROR_INVALID_DTYPE = 2,  /* an element type is not supported or does not match */
  DHP_ERROR_UNSUPPORTED = 3,    /* valid request, but not on this device / build (e.g. not sm_90) */
  DHP_ERROR_CUDA = 4,           /* the CUDA runtime or driver reported an error */
} dhp_status;

/* The sentence describing the last failure on the calling thread ("" after a success). */
DHP_API const char* dhp_last_error(void);

/* "MAJOR.MINOR.PATCH" */
DHP_API const char* dhp_version(void);

/* How this library was built, as one JSON object: {"version", "cuda", "arch", "dtypes", "head_dims",
 * "backward_head_dims", "forward_tiles", "persistent_causal_max_seqlen_k", "causal_section_bytes",
 * "key_split_min_blocks", "key_split_narrow_min_blocks", "key_split_max_ctas", "key_split_waves", "key_split_max_runs", "key_split_narrow_rows",
 * "key_split_stream_ctas", "key_split_wave_blocks",
 * "backward_two_dq_chains_max_seqlen_k", "backward_two_dq_chains_min_seqlen_k", "backward_paired_key_blocks_head_dims",
 * "backward_unpaired_max_seqlen_k", "backward_causal_paired_min_group", "backward_causal_split_walks_over",
 * "backward_causal_head_halves_min_group"}.
 * "forward_tiles" lists the forward's tile configurations: {"head_dim", "causal", "tier", "max_seqlen_k" (null: any
 * seqlen_k; else the short-key tier's limit, which takes precedence up to it), "min_seqlen_k" (null; else the
 * long-key tier's: from it on, that tier takes what the main tier would run; with a "max_seqlen_k" too, the scheduled
 * short tier's: from it up to that limit, it takes what the short-key tier would run), "max_seqlen_q" (null; else the split
 * tier's limit: up to it, a seqlen_q whose last query tile holds at most 64 rows takes that tier where the main tier
 * would run; for the key-split tier, the seqlen_q up to which it runs), "block_m", "block_n", "stages", "q_buffers",
 * "consumer_warpgroups", "split_tile", "split_rows" (null; else the most rows of a split tile), "key_splits",
 * "scheduled" (a causal tier whose launches may take a static schedule of the persistent grid), ...}.
 * Key splits: where seqlen_q is at most the key-split tier's "max_seqlen_q" and seqlen_k spans at least
 * 2 x "key_split_min_blocks" 128-key blocks, the query heads that share a K/V head are packed into a tile's rows (as
 * many as the largest power of two dividing heads_q / heads_kv, at most 64) and each tile's key blocks are split into
 * min(blocks / m, c) runs, m = "key_split_narrow_min_blocks" for a tile of at most "key_split_narrow_rows" packed rows
 * and "key_split_min_blocks" for the others, whose partial results are joined in a fixed order; c is the first
 * cluster size of "key_split_waves" ([cluster size, clusters at once], from "key_split_max_ctas" down) whose clusters
 * at once hold one cluster for each of the sequence's tiles (heads_q / packed heads x tiles of 128 packed rows), else 1
 * (no splits); the runs depend on seqlen_q, seqlen_k and the head counts, never on the batch. A tile's runs go to the
 * CTAs of a cluster, one each, or for a tile of at most "key_split_narrow_rows" packed rows up to
 * "key_split_max_runs" (by head_dim) each, as a model of the waves with "key_split_stream_ctas" and
 * "key_split_wave_blocks" finds fastest for the launch's tiles (so with the batch): that changes no bit.
 * Causal forwards with seqlen_k <= "persistent_causal_max_seqlen_k" (by head_dim) run on a persistent grid, their tiles
 * listed as a model of the grid balances best (head by head, in sections of heads or all heads at once) or dealt by a
 * static schedule computed from the shapes (in the tiers whose "forward_tiles" entry has "scheduled": true), or,
 * where none balances a launch of a few rounds, one CTA per tile; longer ones keep the persistent grid where a
 * scheduled tier takes its schedule, else take the heads in sections whose K and V
 * fit "causal_section_bytes", heaviest query blocks first (grid and tile order only: the results depend on neither).
 * "backward_two_dq_chains_max_seqlen_k" maps each backward head_dim to the longest seqlen_k whose non-causal MHA
 * backward keeps two dQ sums, "backward_two_dq_chains_min_seqlen_k" to the seqlen_k above which it does (0: from 1);
 * "backward_paired_key_blocks_head_dims" lists the head_dims whose backward runs its key
 * blocks in pairs (2-CTA clusters) for some problems, and "backward_unpaired_max_seqlen_k" maps each of them to the
 * longest seqlen_k whose non-causal MHA backward runs them unpaired (0: none), and "backward_causal_paired_min_group"
 * to the number of query heads per K/V head from which a causal backward pairs them (1: always; 0: never).
 * "backward_causal_split_walks_over"
 * maps each backward head_dim to the query rows over which a key block's walk (the query rows that see it) is split
 * between two CTAs in a causal backward that is not GQA (0: never); an MHA problem with seqlen_q = seqlen_k splits
 * from seqlen_q above that. "backward_causal_head_halves_min_group" maps each backward head_dim to the number of query
 * heads per K/V head from which a causal GQA backward runs each key block's walk as two CTAs, each over half of the
 * group's query heads (0: never). */
DHP_API const char* dhp_build_info(void);

/* Number of visible CUDA devices; *count = 0 (and DHP_SUCCESS) when there is no GPU or driver. */
DHP_API dhp_status dhp_device_count(int* count);

typedef struct dhp_device_info {
  char name[256];
  int compute_major;
  int compute_minor;
  int multiprocessors;
  int supported; /* 1 when dhp's kernels run on this device (sm_90) */
} dhp_device_info;

DHP_API dhp_status dhp_get_device_info(int device, dhp_device_info* info);

typedef struct dhp_attention_options {
  int causal;          /* 0: full attention; 1: causal mask aligned to the bottom-right corner */
  float softmax_scale; /* 0: use 1/sqrt(head_dim); otherwise a positive finite number */
} dhp_attention_options;

#define DHP_ATTENTION_OPTIONS_DEFAULT {0, 0.0f}

/* out = softmax(q k^T * scale [+ causal mask]) v, per (batch, query head); kv head = q head / (heads_q / heads_kv).
 *
 *   q   (batch, seqlen_q, heads_q,  head_dim)  bf16 or fp16
 *   k   (batch, seqlen_k, heads_kv, head_dim)  same dtype as q
 *   v   (batch, seqlen_k, heads_kv, head_dim)  same dtype as q
 *   out (batch, seqlen_q, heads_q,  head_dim)  same dtype as q; must not overlap q, k, v or lse
 *   lse (batch, heads_q, seqlen_q) float32, or NULL: log-sum-exp of the scaled scores per query row
 *
 * head_dim is 64, 128 or 256; heads_q % heads_kv == 0. A query row that sees no key (causal with
 * seqlen_q > seqlen_k) gets out = 0 and lse = -inf. All tensors on the same CUDA device, an sm_90 GPU.
 * Strides are free within TMA's rules: last dimension contiguous, other strides multiples of 16 bytes,
 * base pointers 16-byte aligned. batch == 0 or seqlen_q == 0 is a valid empty call that launches nothing. */
DHP_API dhp_status dhp_attention_forward(const DLTensor* q, const DLTensor* k, const DLTensor* v,
                                         DLTensor* out, DLTensor* lse,
                                         const dhp_attention_options* options, cudaStream_t stream);

/* The same validation as dhp_attention_forward, device checks included, without launching anything. */
DHP_API dhp_status dhp_attention_forward_check(const DLTensor* q, const DLTensor* k, const DLTensor* v,
                                               const DLTensor* out, const DLTensor* lse,
                                               const dhp_attention_options* options);

/* Scratch memory that dhp_attention_backward needs for these shapes, in bytes (a multiple of 256).
 * It depends on q's batch, heads_q, seqlen_q and head_dim and on the options only. */
DHP_API dhp_status dhp_attention_backward_workspace_size(const DLTensor* q, const DLTensor* k,
                                                         const dhp_attention_options* options, size_t* bytes);

/* Gradients of dhp_attention_forward: given dout = dL/dout, writes dq, dk, dv = dL/dq, dL/dk, dL/dv.
 *
 *   q, k, v, options  as given to the forward
 *   out, lse          the forward's outputs for them (lse is required here)
 *   dout              q's shape and dtype
 *   dq                q's shape and dtype;   dk, dv   k's shape and dtype
 *   workspace         device memory of at least dhp_attention_backward_workspace_size() bytes, 256-byte aligned,
 *                     used only by this call (its contents need not be initialised and are left undefined)
 *
 * Bitwise deterministic: every sum runs in a fixed order (dk and dv of a KV head sum its query heads in head
 * order; dq sums key blocks in descending order), so the same inputs give the same bits on every run and
 * stream. dq, dk, dv must not overlap each other or any input. Same stride and alignment rules as the forward.
 * The call's kernels overlap one another on `stream` (programmatic dependent launch); the last of them completes only
 * after all of the call's writes, so work queued after it on the stream sees dq, dk and dv. */
DHP_API dhp_status dhp_attention_backward(const DLTensor* q, const DLTensor* k, const DLTensor* v,
                                          const DLTensor* out, const DLTensor* dout, const DLTensor* lse,
                                          DLTensor* dq, DLTensor* dk, DLTensor* dv,
                                          const dhp_attention_options* options, void* workspace,
                                          size_t workspace_bytes, cudaStream_t stream);

/* The same validation as dhp_attention_backward, device checks included, without launching anything. */
DHP_API dhp_status dhp_attention_backward_check(const DLTensor* q, const DLTensor* k, const DLTensor* v,
                                                const DLTensor* out, const DLTensor* dout, const DLTensor* lse,
                                                const DLTensor* dq, const DLTensor* dk, const DLTensor* dv,
                                                const dhp_attention_options* options, const void* workspace,
                                                size_t workspace_bytes);

#ifdef __cplusplus
}
#endif

#endif /* DHP_DHP_H_ */
