// Paged KV cache kernels. Shapes as in kernels/src/paged.rs:
//   cache   [num_blocks, block_size, num_kv_heads, head_dim]  (f32, f16 or bf16)
//   q       [num_tokens, num_heads, head_dim]                 (f32)
//   out     [num_tokens, num_heads, head_dim]                 (f32)
#include "common.cuh"

// Copies each token's row of `row` elements to its slot: dst[slot * row + i] = src[t * row + i].
// Grid: one block per token. Works on raw 16- or 32-bit elements.
template <typename T>
__device__ void write_slots(const T* __restrict__ src, T* __restrict__ dst,
                            const uint32_t* __restrict__ slots, uint32_t row) {
  const uint32_t t = blockIdx.x;
  const uint64_t slot = slots[t];
  for (uint32_t i = threadIdx.x; i < row; i += blockDim.x) {
    dst[slot * row + i] = src[(uint64_t)t * row + i];
  }
}

extern "C" __global__ void write_slots_u16(const uint16_t* src, uint16_t* dst, const uint32_t* slots, uint32_t row) {
  write_slots(src, dst, slots, row);
}
extern "C" __global__ void write_slots_u32(const uint32_t* src, uint32_t* dst, const uint32_t* slots, uint32_t row) {
  write_slots(src, dst, slots, row);
}

constexpr int MAX_PER_LANE = 8;  // head_dim <= 256
constexpr int WARPS = 4;
constexpr int CHUNK = 256;        // context positions scored at once

// One warp per (query token, head), flash-attention style over the context in chunks: lanes
// score CHUNK positions in parallel (one position per lane at a time) into shared memory, the
// chunk's max and sum rescale the running softmax, then lanes (split over the head dimension)
// accumulate the weighted values. No score matrix beyond one chunk is stored.
//   token_seq[t]  sequence index of token t;  token_pos[t]  its absolute position.
template <typename T>
__device__ void paged_attention(const float* __restrict__ q, const T* __restrict__ k_cache,
                                const T* __restrict__ v_cache, const uint32_t* __restrict__ block_tables,
                                const uint32_t* __restrict__ token_seq, const uint32_t* __restrict__ token_pos,
                                float* __restrict__ out, uint32_t num_tokens, uint32_t num_heads,
                                uint32_t num_kv_heads, uint32_t head_dim, uint32_t block_size,
                                uint32_t max_blocks_per_seq, float scale) {
  __shared__ float q_smem[WARPS][MAX_PER_LANE * 32];
  __shared__ float p_smem[WARPS][CHUNK];
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const uint64_t pair = (uint64_t)blockIdx.x * WARPS + warp;
  if (pair >= (uint64_t)num_tokens * num_heads) return;
  const uint32_t t = pair / num_heads;
  const uint32_t h = pair % num_heads;
  const uint32_t kvh = h / (num_heads / num_kv_heads);
  const uint32_t seq = token_seq[t];
  const uint32_t ctx = token_pos[t] + 1;
  const uint32_t* table = block_tables + (uint64_t)seq * max_blocks_per_seq;
  const uint64_t row = (uint64_t)num_kv_heads * head_dim;
  float* qs = q_smem[warp];
  float* ps = p_smem[warp];

  for (uint32_t d = lane; d < head_dim; d += 32) qs[d] = q[((uint64_t)t * num_heads + h) * head_dim + d] * scale;
  float acc[MAX_PER_LANE];
#pragma unroll
  for (int i = 0; i < MAX_PER_LANE; ++i) acc[i] = 0.f;
  float m = -INFINITY;
  float l = 0.f;
  __syncwarp();
  for (uint32_t start = 0; start < ctx; start += CHUNK) {
    const uint32_t n = min((uint32_t)CHUNK, ctx - start);
    float local_max = -INFINITY;
    for (uint32_t j = lane; j < n; j += 32) {
      const uint32_t p = start + j;
      const uint64_t slot = (uint64_t)table[p / block_size] * block_size + p % block_size;
      const T* kr = k_cache + slot * row + (uint64_t)kvh * head_dim;
      float s = 0.f;
      for (uint32_t d = 0; d < head_dim; ++d) s += qs[d] * to_float(kr[d]);
      ps[j] = s;
      local_max = fmaxf(local_max, s);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffff, local_max, off));
    const float m_new = fmaxf(m, local_max);
    const float correction = __expf(m - m_new);
    float local_sum = 0.f;
    __syncwarp();
    for (uint32_t j = lane; j < n; j += 32) {
      const float e = __expf(ps[j] - m_new);
      ps[j] = e;
      local_sum += e;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) local_sum += __shfl_xor_sync(0xffffffff, local_sum, off);
    l = l * correction + local_sum;
    __syncwarp();
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; ++i) acc[i] *= correction;
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t p = start + j;
      const uint64_t slot = (uint64_t)table[p / block_size] * block_size + p % block_size;
      const T* vr = v_cache + slot * row + (uint64_t)kvh * head_dim;
      const float w = ps[j];
#pragma unroll
      for (int i = 0; i < MAX_PER_LANE; ++i) {
        const uint32_t d = i * 32 + lane;
        if (d < head_dim) acc[i] += w * to_float(vr[d]);
      }
    }
    m = m_new;
    __syncwarp();
  }
#pragma unroll
  for (int i = 0; i < MAX_PER_LANE; ++i) {
    const uint32_t d = i * 32 + lane;
    if (d < head_dim) out[((uint64_t)t * num_heads + h) * head_dim + d] = acc[i] / l;
  }
}

#define PAGED_ATTENTION(NAME, T)                                                                   \
  extern "C" __global__ void NAME(const float* q, const T* k, const T* v, const uint32_t* tables,  \
                                  const uint32_t* token_seq, const uint32_t* token_pos, float* out, \
                                  uint32_t num_tokens, uint32_t num_heads, uint32_t num_kv_heads,  \
                                  uint32_t head_dim, uint32_t block_size,                          \
                                  uint32_t max_blocks_per_seq, float scale) {                      \
    paged_attention<T>(q, k, v, tables, token_seq, token_pos, out, num_tokens, num_heads,          \
                       num_kv_heads, head_dim, block_size, max_blocks_per_seq, scale);             \
  }

PAGED_ATTENTION(paged_attention_f32, float)
PAGED_ATTENTION(paged_attention_f16, __half)
PAGED_ATTENTION(paged_attention_bf16, __nv_bfloat16)
