/* wgmma_probe_s14.cu: which shared memory descriptor convention the
 * transposed (MN-major, no swizzle) B operand of wgmma takes, checked on
 * the H200 (notes/gpu.md "Session 14", probe_s14_r2.log): S = A B for a
 * 64 x 64 A in registers and a 64 x 64 B laid out as prefill's K tile
 * ("K") or V tile ("V"), with the two byte offsets swapped or not and
 * trans-b 1 or 0, against the product on the host.
 *   nvcc -gencode arch=compute_90a,code=sm_90a -o probe wgmma_probe_s14.cu */
#include <cstdio>
#include <cstdint>
#include <cmath>
#include <cuda_fp16.h>
__device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr >> 4) & 0x3fff) | (uint64_t)((lbo >> 4) & 0x3fff) << 16 | (uint64_t)((sbo >> 4) & 0x3fff) << 32;
}
/* D(64 x 64) += A(64 x 16, registers) B(16 x 64, shared memory); TB: imm-trans-b */
#define ACC4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
template <int TB> __device__ __forceinline__ void wgmma_rs64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {"
                 "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
                 "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
                 "{%32,%33,%34,%35}, %36, 1, 1, 1, %37;\n"
                 : ACC4(0), ACC4(1), ACC4(2), ACC4(3), ACC4(4), ACC4(5), ACC4(6), ACC4(7)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TB));
}
#undef ACC4
__device__ __forceinline__ uint32_t pack(float a, float b) { __half2 h = __floats2half2_rn(a, b); return *reinterpret_cast<uint32_t *>(&h); }
constexpr int D = 64;
__device__ int k_at(int pg, int dim) { return ((pg * (D / 8) + (dim >> 3)) * 8 + (dim & 7)) * 8; }
__device__ int v_at(int pos, int dg) { return (((pos >> 3) * (D / 8) + dg) * 8 + (pos & 7)) * 8; }
/* A (64 x 64: rows x red), B (64 red x 64 n) as floats; out 64 x 64. mode: bit0 swap lbo/sbo, bit1 trans 0; which: 0 = K layout, 1 = V layout */
__global__ void probe(const float *A, const float *B, float *out, int mode, int which) {
    __shared__ __align__(128) __half sb[64 * 64];
    const int tid = threadIdx.x;
    for (int i = tid; i < 64 * 64; i += 128) {
        const int r = i / 64, n = i % 64;   /* B[r][n] */
        int off;
        if (which == 0) off = k_at(n >> 3, r) + (n & 7);      /* K: dim r, position n */
        else off = v_at(r, n >> 3) + (n & 7);                  /* V: position r, dim n */
        sb[off] = __float2half(B[i]);
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    const int warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
    float d[8][4];
    for (int j = 0; j < 8; j++) d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    for (int kk = 0; kk < 4; kk++) {
        uint32_t a[4];
        for (int hc = 0; hc < 2; hc++) for (int h = 0; h < 2; h++) {
            const int row = 16 * warp + gid + 8 * h, col = 16 * kk + 8 * hc + 2 * tig;
            a[hc * 2 + h] = pack(A[row * 64 + col], A[row * 64 + col + 1]);
        }
        uint32_t base = smem_addr(sb), lbo, sbo, start;
        if (which == 0) { start = base + 256 * kk; lbo = 128; sbo = 16 * D; }
        else { start = base + 32 * D * kk; lbo = 16 * D; sbo = 128; }
        if (mode & 1) { uint32_t t = lbo; lbo = sbo; sbo = t; }
        if (mode & 2) wgmma_rs64<0>(d, a, gmma_desc(start, lbo, sbo));
        else wgmma_rs64<1>(d, a, gmma_desc(start, lbo, sbo));
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    for (int j = 0; j < 8; j++) for (int e = 0; e < 4; e++) {
        asm volatile("" : "+f"(d[j][e]));
        const int row = 16 * warp + gid + 8 * (e >> 1), col = 8 * j + 2 * tig + (e & 1);
        out[row * 64 + col] = d[j][e];
    }
}
int main() {
    static float A[4096], B[4096], R[4096], O[4096];
    for (int i = 0; i < 4096; i++) { A[i] = (float)((i * 37 % 17) - 8) / 8; B[i] = (float)((i * 53 % 13) - 6) / 4; }
    for (int r = 0; r < 64; r++) for (int n = 0; n < 64; n++) { double s = 0; for (int k = 0; k < 64; k++) s += (double)A[r * 64 + k] * B[k * 64 + n]; R[r * 64 + n] = (float)s; }
    float *dA, *dB, *dO;
    cudaMalloc(&dA, sizeof A); cudaMalloc(&dB, sizeof B); cudaMalloc(&dO, sizeof O);
    cudaMemcpy(dA, A, sizeof A, cudaMemcpyHostToDevice); cudaMemcpy(dB, B, sizeof B, cudaMemcpyHostToDevice);
    for (int which = 0; which < 2; which++) for (int mode = 0; mode < 4; mode++) {
        cudaMemset(dO, 0, sizeof O);
        probe<<<1, 128>>>(dA, dB, dO, mode, which);
        cudaError_t e = cudaDeviceSynchronize();
        cudaMemcpy(O, dO, sizeof O, cudaMemcpyDeviceToHost);
        double mx = 0; int bad = 0;
        for (int i = 0; i < 4096; i++) { double df = fabs(O[i] - R[i]); if (df > mx) mx = df; if (df > 1e-3) bad++; }
        printf("%s swap=%d trans0=%d: %s max abs err %.4g, %d wrong of 4096; O[0..3] %g %g %g %g vs %g %g %g %g\n", which ? "V" : "K", mode & 1, mode >> 1, cudaGetErrorString(e), mx, bad, O[0], O[1], O[64], O[65], R[0], R[1], R[64], R[65]);
    }
    return 0;
}
