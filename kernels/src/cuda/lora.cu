// Batched LoRA (BGMV) kernels over packed projections. Shapes as in kernels/src/lora.rs:
//   x   [T, IN]   a [S * n * R, IN]   bt: part j at bt + base_j, [S * R, OUT_j]   (one dtype)
//   slots [T] (u32, 0xffffffff = no adapter)
//   v   [T, n * R] f32:  v = a[s] x          y [T, sum OUT_j] += bt[s]^T v, in place
#include "common.cuh"

constexpr uint32_t NO_SLOT = 0xffffffffu;
constexpr int WARPS = 4;

// 16-byte vectors: N elements of T in one load or store.
template <typename T> struct Vec { static constexpr int N = 8; };
template <> struct Vec<float> { static constexpr int N = 4; };

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) { return ((uintptr_t)p & 15) == 0; }

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(e[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* v) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) store(e + i, v[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// One warp per (token, row of A): a dot product over IN, with 16-byte loads where the rows allow.
// `rows` = n * R.
template <typename T>
__device__ void lora_shrink(const T* __restrict__ x, const T* __restrict__ a,
                            const uint32_t* __restrict__ slots, float* __restrict__ v,
                            uint32_t num_tokens, uint32_t rows, uint32_t in_f) {
  const uint32_t warp = threadIdx.x / 32;
  const uint32_t lane = threadIdx.x % 32;
  const uint64_t pair = (uint64_t)blockIdx.x * WARPS + warp;
  if (pair >= (uint64_t)num_tokens * rows) return;
  const uint32_t t = pair / rows;
  const uint32_t r = pair % rows;
  const uint32_t s = slots[t];
  float acc = 0.f;
  if (s != NO_SLOT) {
    const T* xr = x + (uint64_t)t * in_f;
    const T* ar = a + ((uint64_t)s * rows + r) * in_f;
    constexpr int N = Vec<T>::N;
    if (in_f % N == 0 && aligned16(xr) && aligned16(ar)) {
      float xv[N], av[N];
      for (uint32_t i = lane * N; i < in_f; i += 32 * N) {
        load_vec(xr + i, xv);
        load_vec(ar + i, av);
#pragma unroll
        for (int e = 0; e < N; ++e) acc += xv[e] * av[e];
      }
    } else {
      for (uint32_t i = lane; i < in_f; i += 32) acc += to_float(xr[i]) * to_float(ar[i]);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) v[pair] = acc;
}

// One thread per (token, N consecutive output columns of the fused output): grid
// (ceil(total / (N * blockDim)), T). Up to three parts: columns [0, out0) are part 0, then out1
// columns of part 1, then part 2. 16-byte loads and stores when every part's width is a
// multiple of N (a thread's columns then never straddle two parts) and the rows are aligned.
template <typename T>
__device__ void lora_expand(T* __restrict__ y, const float* __restrict__ v, const T* __restrict__ bt,
                            const uint32_t* __restrict__ slots, uint32_t rank, uint32_t num_parts,
                            uint32_t out0, uint32_t out1, uint32_t out2, uint64_t base1, uint64_t base2) {
  constexpr int N = Vec<T>::N;
  const uint32_t t = blockIdx.y;
  const uint32_t total = out0 + out1 + out2;
  const uint32_t first = (blockIdx.x * blockDim.x + threadIdx.x) * N;
  if (first >= total) return;
  const uint32_t s = slots[t];
  if (s == NO_SLOT) return;
  const bool vec = out0 % N == 0 && out1 % N == 0 && out2 % N == 0 && aligned16(y) && aligned16(bt) &&
                   base1 % N == 0 && base2 % N == 0;
  const uint32_t last = min(first + N, total);
  for (uint32_t o = first; o < last; o += vec ? N : 1) {
    uint32_t j = 0, oc = o, out_f = out0;
    uint64_t base = 0;
    if (o >= out0 + out1) {
      j = 2; oc = o - out0 - out1; out_f = out2; base = base2;
    } else if (o >= out0) {
      j = 1; oc = o - out0; out_f = out1; base = base1;
    }
    const float* vt = v + ((uint64_t)t * num_parts + j) * rank;
    const T* b = bt + base + (uint64_t)s * rank * out_f + oc;
    T* yp = y + (uint64_t)t * total + o;
    if (vec) {
      float acc[N], bv[N];
      load_vec(yp, acc);
      for (uint32_t k = 0; k < rank; ++k) {
        load_vec(b + (uint64_t)k * out_f, bv);
        const float w = vt[k];
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += w * bv[e];
      }
      store_vec(yp, acc);
    } else {
      float acc = 0.f;
      for (uint32_t k = 0; k < rank; ++k) acc += vt[k] * to_float(b[(uint64_t)k * out_f]);
      store(yp, to_float(*yp) + acc);
    }
  }
}

#define LORA(name, T)                                                                               \
  extern "C" __global__ void lora_shrink_##name(const T* x, const T* a, const uint32_t* slots,     \
                                                float* v, uint32_t num_tokens, uint32_t rows,       \
                                                uint32_t in_f) {                                    \
    lora_shrink(x, a, slots, v, num_tokens, rows, in_f);                                            \
  }                                                                                                 \
  extern "C" __global__ void lora_expand_##name(T* y, const float* v, const T* bt,                  \
                                                const uint32_t* slots, uint32_t rank,               \
                                                uint32_t num_parts, uint32_t out0, uint32_t out1,   \
                                                uint32_t out2, uint64_t base1, uint64_t base2) {    \
    lora_expand(y, v, bt, slots, rank, num_parts, out0, out1, out2, base1, base2);                 \
  }

LORA(f32, float)
LORA(f16, __half)
LORA(bf16, __nv_bfloat16)
