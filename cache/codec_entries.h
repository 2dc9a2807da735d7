/* codec_entries.h: the per-call driver of the scores and weighted-sum
 * kernels and the per-format entry points, shared by codec_avx2.c and
 * codec_avx512.c. Not a header of declarations: each of those files includes
 * it once, after its own scores_rows (R query rows over a block's tokens)
 * and accum_dispatch (R rows over a range of dimensions), which are the only
 * parts that differ between the two. The folds computed here enter every
 * lane, so both files get the same bits from them. */

/* q rows for the tile loops: int4 per channel multiplies them by the
 * channel scales first (into qbuf), so a code needs no scale in the loop. */
KVC__INLINE void scores_impl(elem e, const void *blk, int B, int dim, int n, const float *q,
                             int nr, float *s, int s_stride) {
    fold_aux aux;
    float cs[1024], mn[1024], qbuf[4 * 1024];       /* int4 per channel: dim <= 1024 */
    if (e == E_U4C) {
        const uint16_t *p = u4_params(blk, KVC__ROLE_K, B, dim);
        f16_row(p, dim, cs);
        f16_row(p + dim, dim, mn);
    }
    for (int r0 = 0; r0 < nr; r0 += 4) {
        const float *qr = q + (size_t)r0 * dim;
        float *sr = s + (size_t)r0 * s_stride;
        int R = nr - r0 < 4 ? nr - r0 : 4;
        scores_folds(e, qr, R, dim, cs, mn, qbuf, &aux);
        if (e == E_U4C) qr = qbuf;
        switch (R) {
        case 1: scores_rows(e, 1, blk, B, dim, n, qr, sr, s_stride, &aux); break;
        case 2: scores_rows(e, 2, blk, B, dim, n, qr, sr, s_stride, &aux); break;
        case 3: scores_rows(e, 3, blk, B, dim, n, qr, sr, s_stride, &aux); break;
        default: scores_rows(e, 4, blk, B, dim, n, qr, sr, s_stride, &aux); break;
        }
    }
}

KVC__INLINE void accum_impl(elem e, const void *blk, int B, int dim, int n, const float *w,
                            int w_stride, int nr, float *acc) {
    float wsc[4 * 1024];          /* weights times the tokens' scales; B <= 1024 */
    for (int r0 = 0; r0 < nr; r0 += 4) {
        int R = nr - r0 < 4 ? nr - r0 : 4;
        const float *wr = w + (size_t)r0 * w_stride;
        float *ar = acc + (size_t)r0 * dim;
        if (u4_gs(e)) {                              /* per group: scaled weights, then the minima */
            const int GS = u4_gs(e), G = kvc__u4_groups(dim, GS);
            const uint16_t *sc = u4_params(blk, KVC__ROLE_V, B, dim), *mn = sc + (size_t)G * B;
            float sf[1024], mf[1024];
            for (int g = 0; g < G; g++) {
                int d0 = g * GS, d1 = d0 + GS < dim ? d0 + GS : dim;
                float bias[4] = {0};
                f16_row(sc + (size_t)g * B, n, sf);
                f16_row(mn + (size_t)g * B, n, mf);
                for (int r = 0; r < R; r++) {
                    const float *wrow = wr + (size_t)r * w_stride;
                    mul_row(wrow, sf, n, wsc + r * n);
                    bias[r] = dot_row(wrow, mf, n);
                }
                accum_dispatch(e, R, blk, kvc__even(dim), dim, d0, d1, n, wsc, n, ar);
                for (int r = 0; r < R; r++) {
                    float *arow = ar + (size_t)r * dim;
                    __m256 b8 = _mm256_set1_ps(bias[r]);
                    int d = d0;
                    for (; d + 8 <= d1; d += 8) _mm256_storeu_ps(arow + d, _mm256_add_ps(_mm256_loadu_ps(arow + d), b8));
                    for (; d < d1; d++) arow[d] += bias[r];
                }
            }
            continue;
        }
        int ws = w_stride;
        if (e == E_I8) {
            float sf[1024];
            f16_row(i8_scales(blk, B, dim), n, sf);
            for (int r = 0; r < R; r++) mul_row(wr + (size_t)r * w_stride, sf, n, wsc + r * n);
            wr = wsc;
            ws = n;
        }
        accum_dispatch(e, R, blk, v_stride(e, dim), dim, 0, dim, n, wr, ws, ar);
    }
}

static void scores_f32(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_F32, blk, B, dim, n, q, nr, s, ss);
}
static void scores_f16(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_F16, blk, B, dim, n, q, nr, s, ss);
}
static void scores_i8(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_I8, blk, B, dim, n, q, nr, s, ss);
}
static void scores_u4(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_U4, blk, B, dim, n, q, nr, s, ss);
}
static void scores_u4g64(const void *blk, int B, int dim, int n, const float *q, int nr, float *s,
                         int ss) {
    scores_impl(E_U4G64, blk, B, dim, n, q, nr, s, ss);
}
static void scores_u4c(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_U4C, blk, B, dim, n, q, nr, s, ss);
}
static void accum_f32(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_F32, blk, B, dim, n, w, ws, nr, acc);
}
static void accum_f16(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_F16, blk, B, dim, n, w, ws, nr, acc);
}
static void accum_i8(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_I8, blk, B, dim, n, w, ws, nr, acc);
}
static void accum_u4(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_U4, blk, B, dim, n, w, ws, nr, acc);
}
static void accum_u4g64(const void *blk, int B, int dim, int n, const float *w, int ws, int nr,
                        float *acc) {
    accum_impl(E_U4G64, blk, B, dim, n, w, ws, nr, acc);
}
