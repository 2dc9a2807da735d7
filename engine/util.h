/* util.h: small helpers the engine's loaders share. */
#ifndef ENG_UTIL_H
#define ENG_UTIL_H

#include <stddef.h>

/* Formats a message into err (errlen bytes, truncated); nothing when err is
 * NULL or errlen is 0. */
__attribute__((format(printf, 3, 4)))
void eng_seterr(char *err, size_t errlen, const char *fmt, ...);

/* "dir/name", malloc'd; NULL when out of memory. */
char *eng_path_join(const char *dir, const char *name);

#endif
