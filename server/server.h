/* server.h: the kvserve daemon: the HTTP layer (http.h) wired to the engine
 * (engine/engine.h) through the OpenAI API (api/openai.h).
 *
 * Threads (DESIGN.md §2): the libuv loop thread does socket I/O, routing and
 * reply rendering only; request bodies are validated, chat-templated and
 * tokenized on libuv's worker pool (uv_queue_work); the model loads on a
 * worker too, after the port is listening (GET /health says "loading" until
 * then). The engine thread delivers token events through a locked queue and
 * uv_async_send; a client that hangs up has its engine request cancelled at
 * once, which frees its pages at the engine's next step. */
#ifndef SRV_SERVER_H
#define SRV_SERVER_H

#include <stdio.h>

#include "api/profile.h"

/* Runs the daemon with cfg (validated: see cmd_serve.c) until SIGTERM or
 * SIGINT has drained it. profile names the profile for logs and metrics (or
 * NULL). Returns the process exit status: 0 after a clean drain, 1 when the
 * port cannot be bound or the model cannot be loaded. */
int srv_serve(const api_config *cfg, const char *profile);

/* The directories --profile NAME is looked up in, in order: $KVSERVE_PROFILES,
 * ./deploy/profiles, and deploy/profiles beside the binary (and one level up).
 * Returns how many were written to dirs (at most cap). */
int srv_profile_dirs(const char **dirs, int cap);
/* Applies the profile NAME or FILE to c; the file's path goes to path.
 * Returns 0, or -1 with a message naming the file and the field. */
int srv_config_load_profile(api_config *c, const char *name_or_path, char *path, size_t pathlen, char *err,
                            size_t errlen);
/* Prints the configuration table: every field as a flag, with its default,
 * bounds and help. */
void srv_print_fields(FILE *f);

int cmd_serve(int argc, char **argv);
int cmd_profiles(int argc, char **argv);

#endif
