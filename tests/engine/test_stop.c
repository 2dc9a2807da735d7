/* test_stop.c: the stop-string matcher (engine/stop.c).
 *
 * Hand-made cases for the contract (held-back text, matches across pieces,
 * the first completed of several stop strings, the final flush), then a
 * randomized comparison with a reference computed on the joined text with
 * strstr: the text cut at the start of the stop string that completes first. */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "engine/stop.h"

typedef struct {
    char out[4096];
    int n;
    int matched;
} sink;

static int feed(eng_stop *s, sink *k, const char *piece, bool final) {
    const char *out;
    int len;
    int rc = eng_stop_push(s, piece, (int)strlen(piece), final, &out, &len);
    cr_assert_geq(rc, 0);
    cr_assert_lt(k->n + len, (int)sizeof k->out);
    memcpy(k->out + k->n, out, (size_t)len);
    k->n += len;
    k->out[k->n] = 0;
    if (rc == 1)
        k->matched = 1;
    return len;
}

Test(stop, no_stop_strings_pass_through) {
    eng_stop s;
    cr_assert_eq(eng_stop_init(&s, NULL, 0), 0);
    sink k = {0};
    cr_assert_eq(feed(&s, &k, "hello", false), 5);
    cr_assert_eq(feed(&s, &k, " world", true), 6);
    cr_assert_str_eq(k.out, "hello world");
    eng_stop_dispose(&s);
}

Test(stop, match_across_pieces_is_not_emitted) {
    const char *stops[] = {"abc"};
    eng_stop s;
    cr_assert_eq(eng_stop_init(&s, stops, 1), 0);
    sink k = {0};
    cr_assert_eq(feed(&s, &k, "xxa", false), 2); /* "a" could start "abc": held */
    cr_assert_eq(feed(&s, &k, "b", false), 0);
    cr_assert_eq(feed(&s, &k, "cyy", false), 0);
    cr_assert(k.matched);
    cr_assert_str_eq(k.out, "xx");
    cr_assert_eq(feed(&s, &k, "more", false), 0); /* after a match nothing more */
    eng_stop_dispose(&s);
}

Test(stop, false_alarm_is_released) {
    const char *stops[] = {"abc"};
    eng_stop s;
    eng_stop_init(&s, stops, 1);
    sink k = {0};
    feed(&s, &k, "ab", false);
    cr_assert_str_eq(k.out, "");
    feed(&s, &k, "d", false);
    cr_assert_str_eq(k.out, "abd");
    cr_assert(!k.matched);
    eng_stop_dispose(&s);
}

Test(stop, overlapping_prefix) {
    const char *stops[] = {"aab"};
    eng_stop s;
    eng_stop_init(&s, stops, 1);
    sink k = {0};
    feed(&s, &k, "a", false);
    feed(&s, &k, "a", false);
    feed(&s, &k, "a", false);
    cr_assert_str_eq(k.out, "a"); /* "aa" may still start "aab" */
    feed(&s, &k, "b", false);
    cr_assert(k.matched);
    cr_assert_str_eq(k.out, "a");
    eng_stop_dispose(&s);
}

/* "lo w" completes before "world" does */
Test(stop, first_completed_of_several_and_empty_ignored) {
    const char *stops[] = {"", "world", "lo w"};
    eng_stop s;
    eng_stop_init(&s, stops, 3);
    cr_assert_eq(s.n_stops, 2);
    sink k = {0};
    feed(&s, &k, "hel", false);
    feed(&s, &k, "lo wor", false);
    feed(&s, &k, "ld", false);
    cr_assert(k.matched);
    cr_assert_str_eq(k.out, "hel");
    eng_stop_dispose(&s);
}

Test(stop, final_flush_emits_held_text) {
    const char *stops[] = {"abc"};
    eng_stop s;
    eng_stop_init(&s, stops, 1);
    sink k = {0};
    feed(&s, &k, "xab", false);
    cr_assert_str_eq(k.out, "x");
    feed(&s, &k, "", true);
    cr_assert_str_eq(k.out, "xab");
    cr_assert(!k.matched);
    eng_stop_dispose(&s);
}

Test(stop, multibyte_utf8) {
    const char *stops[] = {"\xc3\xa9t\xc3\xa9"}; /* "été" */
    eng_stop s;
    eng_stop_init(&s, stops, 1);
    sink k = {0};
    feed(&s, &k, "un \xc3\xa9", false);
    cr_assert_str_eq(k.out, "un ");
    feed(&s, &k, "t\xc3\xa9 chaud", false);
    cr_assert(k.matched);
    cr_assert_str_eq(k.out, "un ");
    eng_stop_dispose(&s);
}

static uint64_t rng_next(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

/* Random texts over {a, b, c} cut into random pieces, random stop strings. */
Test(stop, randomized_against_strstr) {
    uint64_t rng = 2024;
    for (int iter = 0; iter < 3000; iter++) {
        char text[64], stops_buf[3][6];
        const char *stops[3];
        int n = 1 + (int)(rng_next(&rng) % 60);
        for (int i = 0; i < n; i++)
            text[i] = (char)('a' + rng_next(&rng) % 3);
        text[n] = 0;
        int n_stops = 1 + (int)(rng_next(&rng) % 3);
        for (int j = 0; j < n_stops; j++) {
            int len = 1 + (int)(rng_next(&rng) % 5);
            for (int i = 0; i < len; i++)
                stops_buf[j][i] = (char)('a' + rng_next(&rng) % 3);
            stops_buf[j][len] = 0;
            stops[j] = stops_buf[j];
        }
        /* reference: generation stops where a stop string first completes
         * (ties: the one starting first); the text ends at its start */
        int expect = n, expect_end = n + 1;
        for (int j = 0; j < n_stops; j++) {
            const char *p = strstr(text, stops[j]);
            if (!p)
                continue;
            int start = (int)(p - text), end = start + (int)strlen(stops[j]);
            if (end < expect_end || (end == expect_end && start < expect)) {
                expect = start;
                expect_end = end;
            }
        }
        eng_stop s;
        eng_stop_init(&s, stops, n_stops);
        sink k = {0};
        for (int at = 0; at < n;) {
            int len = 1 + (int)(rng_next(&rng) % 4);
            if (at + len > n)
                len = n - at;
            char piece[8];
            memcpy(piece, text + at, (size_t)len);
            piece[len] = 0;
            at += len;
            feed(&s, &k, piece, at == n);
            /* nothing emitted may be part of a stop string's match */
            cr_assert_leq(k.n, expect, "iter %d: emitted %d bytes, the match starts at %d (text %s, stops %s %s %s)", iter, k.n, expect, text, stops[0], n_stops > 1 ? stops[1] : "", n_stops > 2 ? stops[2] : "");
        }
        cr_assert_eq(k.n, expect, "iter %d: text %s", iter, text);
        cr_assert_eq(k.matched, expect < n, "iter %d", iter);
        cr_assert_eq(memcmp(k.out, text, (size_t)expect), 0);
        eng_stop_dispose(&s);
    }
}
