// Batched LoRA (BGMV) kernels. Shapes as in kernels/src/lora.rs:
//   x   [T, IN]        a  [S * R, IN]     bt [S * R, OUT]    (f32, f16 or bf16, all the same)
//   slots [T] (u32, 0xffffffff = no adapter)
//   v   [T, R] f32 scratch: v = a[s] x         out [T, OUT] = bt[s]^T v   (x's dtype)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

constexpr uint32_t NO_SLOT = 0xffffffffu;
constexpr int WARPS = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

// One warp per (token, rank row): a dot product over IN.
template <typename T>
__device__ void lora_shrink(const T* __restrict__ x, const T* __restrict__ a,
                            const uint32_t* __restrict__ slots, float* __restrict__ v,
                            uint32_t num_tokens, uint32_t rank, uint32_t in_f) {
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const uint64_t pair = (uint64_t)blockIdx.x * WARPS + warp;
  if (pair >= (uint64_t)num_tokens * rank) return;
  const uint32_t t = pair / rank;
  const uint32_t k = pair % rank;
  const uint32_t s = slots[t];
  float acc = 0.f;
  if (s != NO_SLOT) {
    const T* xr = x + (uint64_t)t * in_f;
    const T* ar = a + ((uint64_t)s * rank + k) * in_f;
    for (uint32_t i = lane; i < in_f; i += 32) acc += to_float(xr[i]) * to_float(ar[i]);
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) v[pair] = acc;
}

// One thread per (token, output feature): grid (ceil(OUT / blockDim), T).
template <typename T>
__device__ void lora_expand(const float* __restrict__ v, const T* __restrict__ bt,
                            const uint32_t* __restrict__ slots, T* __restrict__ out,
                            uint32_t rank, uint32_t out_f) {
  const uint32_t t = blockIdx.y;
  const uint32_t o = blockIdx.x * blockDim.x + threadIdx.x;
  if (o >= out_f) return;
  const uint32_t s = slots[t];
  float acc = 0.f;
  if (s != NO_SLOT) {
    const float* vt = v + (uint64_t)t * rank;
    const T* b = bt + (uint64_t)s * rank * out_f + o;
    for (uint32_t k = 0; k < rank; ++k) acc += vt[k] * to_float(b[(uint64_t)k * out_f]);
  }
  store(out + (uint64_t)t * out_f + o, acc);
}

#define LORA(name, T)                                                                            \
  extern "C" __global__ void lora_shrink_##name(const T* x, const T* a, const uint32_t* slots,   \
                                                float* v, uint32_t num_tokens, uint32_t rank,    \
                                                uint32_t in_f) {                                 \
    lora_shrink(x, a, slots, v, num_tokens, rank, in_f);                                         \
  }                                                                                              \
  extern "C" __global__ void lora_expand_##name(const float* v, const T* bt, const uint32_t* slots, \
                                                T* out, uint32_t rank, uint32_t out_f) {         \
    lora_expand(v, bt, slots, out, rank, out_f);                                                 \
  }

LORA(f32, float)
LORA(f16, __half)
LORA(bf16, __nv_bfloat16)
