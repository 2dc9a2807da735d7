/* stop.h: stop strings matched across token boundaries.
 *
 * Generated text arrives in pieces (one detokenized token at a time). A stop
 * string may start in one piece and end several pieces later, and it must not
 * reach the client. The matcher therefore holds back the longest tail of the
 * text seen so far that is a proper prefix of some stop string, emits the rest,
 * and on a match emits the text before the stop string and nothing after it.
 *
 * Owned by one sequence; used by one thread (the engine thread). */
#ifndef ENG_STOP_H
#define ENG_STOP_H

#include <stdbool.h>

typedef struct {
    char **stops;       /* (n_stops) NUL-terminated copies; empty strings dropped */
    int *stop_len;      /* (n_stops) */
    int n_stops;
    char *hold;         /* (cap_hold) text not emitted yet */
    int n_hold, cap_hold;
    char *emit;         /* (cap_emit) the text returned by the last push */
    int cap_emit;
    bool matched;       /* a stop string was found; later pushes emit nothing */
} eng_stop;

/* Copies the stop strings (empty ones are ignored). Returns 0, or -1 when
 * memory runs out (s is then disposed). */
int eng_stop_init(eng_stop *s, const char *const *stops, int n_stops);
void eng_stop_dispose(eng_stop *s);

/* Feeds the next piece of text. *out / *out_len receive the text that can be
 * emitted now (valid until the next call). With `final` (the sequence ends for
 * another reason) everything held back is emitted unless it contains a stop
 * string. Returns 1 when a stop string matched (*out then ends just before
 * the match that completes first), 0 when none did, -1 when memory runs out. */
int eng_stop_push(eng_stop *s, const char *text, int len, bool final, const char **out, int *out_len);

#endif
