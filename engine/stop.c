/* stop.c: the stop-string matcher (see stop.h): holds back text that could be
 * the start of a stop string so a match spanning several tokens is never
 * partly emitted. */
#define _GNU_SOURCE /* memmem */
#include "engine/stop.h"

#include <stdlib.h>
#include <string.h>

int eng_stop_init(eng_stop *s, const char *const *stops, int n_stops) {
    memset(s, 0, sizeof *s);
    if (n_stops <= 0)
        return 0;
    s->stops = calloc((size_t)n_stops, sizeof *s->stops);
    s->stop_len = calloc((size_t)n_stops, sizeof *s->stop_len);
    if (!s->stops || !s->stop_len)
        goto oom;
    for (int i = 0; i < n_stops; i++) {
        if (!stops[i] || !stops[i][0])
            continue;
        s->stops[s->n_stops] = strdup(stops[i]);
        if (!s->stops[s->n_stops])
            goto oom;
        s->stop_len[s->n_stops] = (int)strlen(stops[i]);
        s->n_stops++;
    }
    return 0;
oom:
    eng_stop_dispose(s);
    return -1;
}

void eng_stop_dispose(eng_stop *s) {
    if (s->stops)
        for (int i = 0; i < s->n_stops; i++)
            free(s->stops[i]);
    free(s->stops);
    free(s->stop_len);
    free(s->hold);
    free(s->emit);
    memset(s, 0, sizeof *s);
}

static int reserve(char **buf, int *cap, int need) {
    if (need <= *cap)
        return 0;
    int c = *cap ? *cap : 64;
    while (c < need)
        c *= 2;
    char *nb = realloc(*buf, (size_t)c);
    if (!nb)
        return -1;
    *buf = nb;
    *cap = c;
    return 0;
}

/* Length of the longest tail of hold[0, n) that is a proper prefix of a stop string. */
static int held_tail(const eng_stop *s, const char *hold, int n) {
    int best = 0;
    for (int i = 0; i < s->n_stops; i++) {
        int max = s->stop_len[i] - 1 < n ? s->stop_len[i] - 1 : n;
        for (int k = max; k > best; k--)
            if (!memcmp(hold + n - k, s->stops[i], (size_t)k)) {
                best = k;
                break;
            }
    }
    return best;
}

int eng_stop_push(eng_stop *s, const char *text, int len, bool final, const char **out, int *out_len) {
    *out = "";
    *out_len = 0;
    if (s->matched)
        return 1;
    if (s->n_stops == 0) { /* nothing to hold back: pass through */
        *out = text;
        *out_len = len;
        return 0;
    }
    if (reserve(&s->hold, &s->cap_hold, s->n_hold + len + 1))
        return -1;
    memcpy(s->hold + s->n_hold, text, (size_t)len);
    s->n_hold += len;
    s->hold[s->n_hold] = 0;

    /* The stop string that completes first wins (the first point where
     * generation would have stopped had it been checked byte by byte; ties go
     * to the one that starts first), so the result does not depend on how the
     * text is cut into tokens. Text emitted before was checked at the previous
     * pushes: only the held text can contain a match. */
    int at = -1, at_end = 0;
    for (int i = 0; i < s->n_stops; i++) {
        const char *p = memmem(s->hold, (size_t)s->n_hold, s->stops[i], (size_t)s->stop_len[i]);
        if (!p)
            continue;
        int start = (int)(p - s->hold), end = start + s->stop_len[i];
        if (at < 0 || end < at_end || (end == at_end && start < at)) {
            at = start;
            at_end = end;
        }
    }
    int n_out = at >= 0 ? at : final ? s->n_hold : s->n_hold - held_tail(s, s->hold, s->n_hold);
    if (reserve(&s->emit, &s->cap_emit, n_out + 1))
        return -1;
    memcpy(s->emit, s->hold, (size_t)n_out);
    s->emit[n_out] = 0;
    if (at >= 0) {
        s->matched = true;
        s->n_hold = 0;
    } else {
        memmove(s->hold, s->hold + n_out, (size_t)(s->n_hold - n_out));
        s->n_hold -= n_out;
    }
    *out = s->emit;
    *out_len = n_out;
    return at >= 0;
}
