/* rows_test.cu: engine/cuda/rows.cu's fused products against a CPU
 * reference in double precision, run on the device machine (a plain
 * program: exit status 0 when every check passes, each failure printed).
 *
 *   rows_test
 *
 * Every epilogue (QKV with RoPE neox and interleaved at head_dim 64 and
 * 128, with and without bias; the residual add from float and from fp16
 * inputs; SwiGLU), each with RMSNorm where it takes one, in one block's
 * columns and in column slices (rows of up to 14336 numbers), at T =
 * 1, 3, 8, 9, 16, 17, 40 and 64 rows, on random weights and inputs with
 * positions up to 40,000 (large RoPE angles). Outputs are poisoned first:
 * every output of the T rows must be written and within the bound, the
 * rows past T untouched.
 *
 * The reference rounds the product's inputs to fp16 as the kernel does
 * (after the norm, as forward.cu's rmsnorm_kernel), multiplies exactly and
 * sums in double; what is left between them is fp32 summation and the
 * norm's inverse in fp32, whose effect on a rounded input is at most one
 * fp16 step: so an output may differ by 2^-10 of the sum of |w x| over its
 * row (bound), plus fp16's own rounding of SwiGLU's output, carried
 * through SwiGLU by its derivatives. A product that read a wrong column,
 * row, token or angle is off by the size of the output itself. */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "engine/cuda/rows.cuh"
#include "tests/cuda/expect.cuh"

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static double uniform() {   /* [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) / (double)(1ull << 52) - 1.0;
}
static float h(double v) { return __half2float(__float2half_rn((float)v)); }

template <typename T> static T *upload(const std::vector<T> &v) {
    T *d = NULL;
    CK(cudaMalloc(&d, v.size() * sizeof(T)));
    CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}

struct shape {
    const char *what;
    eng_rows_epilogue epi;
    int rows, cols;
    bool x_f32, norm, bias;
    int head_dim, n_heads, n_rot, neox;   /* QKV */
};

static void run(const shape &s, int T) {
    const int TA = T + 2;                 /* rows past T must stay as they were */
    const int out_cols = s.epi == ENG_ROWS_SWIGLU ? s.rows / 2 : s.rows;
    std::vector<__half> w((size_t)s.rows * s.cols);
    std::vector<float> wf(w.size());
    for (size_t i = 0; i < w.size(); i++) {
        w[i] = __float2half_rn((float)(0.05 * uniform()));
        wf[i] = __half2float(w[i]);
    }
    std::vector<float> xf((size_t)TA * s.cols), nw(s.cols), bias(s.rows);
    std::vector<__half> xh(xf.size());
    for (size_t i = 0; i < xf.size(); i++) {
        xf[i] = (float)(3.0 * uniform());
        xh[i] = __float2half_rn(xf[i]);
    }
    for (int i = 0; i < s.cols; i++) nw[i] = (float)(1.0 + 0.5 * uniform());
    for (int i = 0; i < s.rows; i++) bias[i] = (float)(0.5 * uniform());
    std::vector<int32_t> pos(TA);
    for (int t = 0; t < TA; t++) pos[t] = (int)((uniform() + 1.0) * 20000.0);
    const int half_d = s.head_dim / 2;
    std::vector<float> inv_freq(half_d > 0 ? half_d : 1);
    for (int i = 0; i < half_d; i++) inv_freq[i] = (float)pow(10000.0, -2.0 * i / s.head_dim);
    const float eps = 1e-5f;

    /* the inputs as the kernel rounds them */
    std::vector<double> xin((size_t)T * s.cols);
    for (int t = 0; t < T; t++) {
        double inv = 1.0;
        if (s.norm) {
            double ss = 0;
            for (int k = 0; k < s.cols; k++) ss += (double)xf[(size_t)t * s.cols + k] * xf[(size_t)t * s.cols + k];
            inv = 1.0 / sqrt(ss / s.cols + eps);
        }
        for (int k = 0; k < s.cols; k++)
            xin[(size_t)t * s.cols + k] = s.x_f32 ? h(xf[(size_t)t * s.cols + k] * inv * (s.norm ? nw[k] : 1.0f))
                                                  : __half2float(xh[(size_t)t * s.cols + k]);
    }
    /* sums and their bounds */
    std::vector<double> sum((size_t)T * s.rows), tol((size_t)T * s.rows);
    for (int t = 0; t < T; t++)
        for (int o = 0; o < s.rows; o++) {
            double acc = 0, mag = 0;
            for (int k = 0; k < s.cols; k++) {
                const double p = (double)wf[(size_t)o * s.cols + k] * xin[(size_t)t * s.cols + k];
                acc += p;
                mag += fabs(p);
            }
            sum[(size_t)t * s.rows + o] = acc + (s.bias ? bias[o] : 0.0);
            tol[(size_t)t * s.rows + o] = mag / 1024.0 + 1e-6;
        }

    /* device buffers, outputs poisoned (y0: the residual to add to) */
    std::vector<float> y0((size_t)TA * out_cols);
    for (auto &v : y0) v = (float)uniform();
    if (s.epi != ENG_ROWS_ADD)
        for (auto &v : y0) v = NAN;
    float *d_y = upload(y0);
    std::vector<__half> yh0((size_t)TA * out_cols, __float2half_rn(NAN));
    __half *d_yh = upload(yh0);
    __half *d_w = upload(w);
    float *d_xf = upload(xf), *d_nw = upload(nw), *d_bias = upload(bias), *d_if = upload(inv_freq);
    __half *d_xh = upload(xh);
    int32_t *d_pos = upload(pos);
    float *d_ws = NULL;
    int *d_cnt = NULL;

    eng_rows_args a = {};
    a.epi = s.epi;
    a.w = d_w;
    a.rows = s.rows;
    a.cols = s.cols;
    a.x = s.x_f32 ? (const void *)d_xf : (const void *)d_xh;
    a.x_stride = s.cols;
    a.x_f32 = s.x_f32;
    a.T = T;
    a.norm = s.norm ? d_nw : NULL;
    a.eps = eps;
    a.y = d_y;
    a.yh = d_yh;
    a.y_stride = out_cols;
    a.bias = s.bias ? d_bias : NULL;
    a.pos = d_pos;
    a.inv_freq = s.epi == ENG_ROWS_QKV && s.n_rot ? d_if : NULL;
    a.n_rot_heads = s.n_rot;
    a.head_dim = s.head_dim;
    a.rope_dim = s.head_dim;
    a.neox = s.neox;
    size_t ws_floats, n_cnt;
    eng_rows_ws_size(&a, &ws_floats, &n_cnt);
    if (ws_floats) {   /* column slices */
        d_ws = upload(std::vector<float>(ws_floats, NAN));
        d_cnt = upload(std::vector<int>(n_cnt, 0));
        a.ws = d_ws;
        a.counters = d_cnt;
    }
    EXPECT(eng_rows_fits(&a), "%s T %d: eng_rows_fits refused it", s.what, T);
    CK(eng_rows_launch(&a, 0));
    CK(cudaDeviceSynchronize());
    if (d_cnt) {   /* the counters left 0 for the next launch */
        std::vector<int> cnt(n_cnt);
        CK(cudaMemcpy(cnt.data(), d_cnt, n_cnt * sizeof(int), cudaMemcpyDeviceToHost));
        int nonzero = 0;
        for (int v : cnt) nonzero += v != 0;
        EXPECT(nonzero == 0, "%s T %d: %d slice counters left non-zero", s.what, T, nonzero);
    }
    std::vector<float> y(y0.size());
    std::vector<__half> yh(yh0.size());
    CK(cudaMemcpy(y.data(), d_y, y.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(yh.data(), d_yh, yh.size() * sizeof(__half), cudaMemcpyDeviceToHost));

    double worst = 0;   /* largest error / bound */
    int bad = 0;
    for (int t = 0; t < T; t++)
        for (int o = 0; o < out_cols; o++) {
            const size_t i = (size_t)t * out_cols + o;
            double ref, bound, got;
            if (s.epi == ENG_ROWS_SWIGLU) {
                const double g = sum[(size_t)t * s.rows + o], u = sum[(size_t)t * s.rows + out_cols + o];
                const double sg = 1.0 / (1.0 + exp(-g)), silu = g * sg, dsilu = sg * (1.0 + g * (1.0 - sg));
                ref = silu * u;
                bound = fabs(dsilu * u) * tol[(size_t)t * s.rows + o] +
                        fabs(silu) * tol[(size_t)t * s.rows + out_cols + o] + fabs(ref) / 1024.0 + 1e-6;
                got = __half2float(yh[i]);
            } else {
                ref = sum[(size_t)t * s.rows + o];
                bound = tol[(size_t)t * s.rows + o];
                const int head = o / (s.head_dim ? s.head_dim : 1), d = s.head_dim ? o % s.head_dim : 0;
                if (s.epi == ENG_ROWS_QKV && s.n_rot && head < s.n_rot) {   /* the pair's rotation */
                    const int i_pair = s.neox ? d % half_d : d / 2;
                    const int da = s.neox ? i_pair : 2 * i_pair, db = s.neox ? i_pair + half_d : 2 * i_pair + 1;
                    const size_t ra = (size_t)t * s.rows + head * s.head_dim + da, rb = ra - da + db;
                    const double ang = (double)pos[t] * (double)inv_freq[i_pair];
                    const double c = (float)cos(ang), sn = (float)sin(ang);
                    ref = d == da ? sum[ra] * c - sum[rb] * sn : sum[ra] * sn + sum[rb] * c;
                    bound = tol[ra] + tol[rb];
                }
                if (s.epi == ENG_ROWS_ADD) ref += y0[i];
                got = y[i];
            }
            const double e = fabs(got - ref);
            if (!(e <= bound)) {
                if (bad++ < 3)
                    printf("  %s T %d: token %d output %d: %.6g, reference %.6g (bound %.3g)\n", s.what, T, t, o, got,
                           ref, bound);
            } else if (e / bound > worst) {
                worst = e / bound;
            }
        }
    EXPECT(bad == 0, "%s T %d: %d of %d outputs outside their bounds", s.what, T, bad, T * out_cols);
    int touched = 0;   /* rows past T */
    for (int t = T; t < TA; t++)
        for (int o = 0; o < out_cols; o++) {
            const size_t i = (size_t)t * out_cols + o;
            const bool written = s.epi == ENG_ROWS_SWIGLU ? !__hisnan(yh[i])
                                 : s.epi == ENG_ROWS_ADD  ? y[i] != y0[i]
                                                          : !isnan(y[i]);
            touched += written;
        }
    EXPECT(touched == 0, "%s T %d: %d outputs past row T written", s.what, T, touched);
    printf("%-44s T %2d: %6d outputs, largest error %.2f of its bound%s\n", s.what, T, T * out_cols, worst,
           ws_floats ? " (column slices)" : "");
    void *bufs[] = {d_y, d_yh, d_w, d_xf, d_nw, d_bias, d_if, d_xh, d_pos, d_ws, d_cnt};
    for (void *p : bufs) cudaFree(p);
}

int main(void) {
    const shape shapes[] = {
        /* SmolLM2's products: QKV (9 + 2 x 3 heads of 64), interleaved RoPE (GGUF) */
        {"qkv, norm, interleaved RoPE, D 64", ENG_ROWS_QKV, 15 * 64, 576, true, true, false, 64, 15, 12, 0},
        {"qkv, norm, neox RoPE, bias, D 64", ENG_ROWS_QKV, 15 * 64, 576, true, true, true, 64, 15, 12, 1},
        {"qkv, norm, neox RoPE, D 128", ENG_ROWS_QKV, 6 * 128, 1024, true, true, false, 128, 6, 5, 1},
        {"qkv, norm, interleaved RoPE, bias, D 128", ENG_ROWS_QKV, 6 * 128, 512, true, true, true, 128, 6, 5, 0},
        {"qkv, no RoPE, bias", ENG_ROWS_QKV, 320, 256, true, true, true, 0, 0, 0, 0},
        {"o: += W att (float), bias", ENG_ROWS_ADD, 576, 576, true, false, true, 0, 0, 0, 0},
        {"down: += W x (fp16)", ENG_ROWS_ADD, 576, 1536, false, false, false, 0, 0, 0, 0},
        {"down: += W x (fp16), 2048 columns, bias", ENG_ROWS_ADD, 256, 2048, false, false, true, 0, 0, 0, 0},
        {"gate/up: norm, SwiGLU", ENG_ROWS_SWIGLU, 2 * 1536, 576, true, true, false, 0, 0, 0, 0},
        {"gate/up: norm, SwiGLU, 1024 columns", ENG_ROWS_SWIGLU, 2 * 256, 1024, true, true, false, 0, 0, 0, 0},
        /* rows longer than a block's share: column slices merged by the last block */
        {"qkv, norm, neox RoPE, D 128, 4096 columns", ENG_ROWS_QKV, 4 * 128, 4096, true, true, true, 128, 4, 3, 1},
        {"qkv, norm, interleaved RoPE, D 64, 2080 columns", ENG_ROWS_QKV, 4 * 64, 2080, true, true, false, 64, 4, 3, 0},
        {"o: += W att (float), 4096 columns", ENG_ROWS_ADD, 256, 4096, true, false, true, 0, 0, 0, 0},
        {"down: += W x (fp16), 14336 columns", ENG_ROWS_ADD, 128, 14336, false, false, false, 0, 0, 0, 0},
        {"gate/up: norm, SwiGLU, 4096 columns", ENG_ROWS_SWIGLU, 2 * 128, 4096, true, true, false, 0, 0, 0, 0},
    };
    const int Ts[] = {1, 3, 8, 9, 16, 17, 40, 64};
    for (const shape &s : shapes)
        for (int T : Ts) run(s, T);

    /* what eng_rows_fits must refuse */
    eng_rows_args a = {};
    a.epi = ENG_ROWS_ADD;
    a.rows = 64;
    a.cols = 4096;
    a.x_stride = 4096;
    a.x_f32 = 1;
    a.T = 1;
    EXPECT(!eng_rows_fits(&a), "4096 float columns admitted without a workspace for their slices");
    a.cols = 1024;
    a.x_stride = 1024;
    a.T = 65;
    EXPECT(!eng_rows_fits(&a), "T 65 admitted");
    a.T = 16;
    a.cols = 1000;
    EXPECT(!eng_rows_fits(&a), "1000 columns (not a multiple of 32) admitted");
    a.cols = 1024;
    a.epi = ENG_ROWS_SWIGLU;
    a.rows = 48;
    EXPECT(!eng_rows_fits(&a), "SwiGLU over 48 rows (24 + 24) admitted");
    a.rows = 64;
    a.bias = (const float *)&a;
    EXPECT(!eng_rows_fits(&a), "SwiGLU with a bias admitted");
    EXPECT(eng_rows_launch(&a, 0) == cudaErrorInvalidValue, "eng_rows_launch ran a product eng_rows_fits refuses");

    printf("rows_test: %d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
