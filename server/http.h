/* http.h: the daemon's HTTP/1.1 layer: a libuv TCP listener, connections,
 * llhttp parsing, limits, timeouts, keep-alive, whole and streamed (chunked)
 * responses, the access log, and graceful drain.
 *
 * Threads: everything here runs on the loop thread. A handler receives each
 * complete request and must finish it exactly once, now or later, on the loop
 * thread: srv_http_respond, or srv_http_stream_begin + writes + _end. A
 * request whose work outlives the handler call sets req->on_abort: it is
 * called when the client disconnects (GONE: the request is freed right after
 * the callback; never write to it again), when the request times out
 * (TIMEOUT) or when a drain's grace period ends (SHUTDOWN); for the last two
 * the connection is still writable and the callback must finish the response
 * before returning.
 *
 * The parser (srv_http_parser) is usable without sockets, for the fuzzer and
 * the unit tests: bytes in, requests or an error status out. */
#ifndef SRV_HTTP_H
#define SRV_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <llhttp.h>
#include <uv.h>

#include "api/openai.h"

typedef struct {
    size_t max_header_bytes;    /* request line + headers (431 beyond) */
    size_t max_body_bytes;      /* body after chunked decoding (413 beyond) */
    int max_connections;        /* open at once (503 beyond) */
    double idle_timeout;        /* s: keep-alive idle, and to receive a whole request (408) */
    double request_timeout;     /* s: from a request's first byte to its response's last */
} srv_http_limits;

typedef struct {
    const char *name;           /* lower-case */
    const char *value;
} srv_http_header;

typedef enum { SRV_ABORT_GONE, SRV_ABORT_TIMEOUT, SRV_ABORT_SHUTDOWN } srv_abort_reason;

typedef struct srv_http_req srv_http_req;
struct srv_http_req {
    /* the parsed request (owned by the request) */
    const char *method;         /* "GET", "POST", ... (static) */
    const char *url;            /* request target, NUL-terminated */
    size_t path_len;            /* url[0, path_len) is the path (before '?') */
    srv_http_header *headers;   /* (n_headers) */
    int n_headers;
    char *body;                 /* (body_len) bytes + NUL; a handler may take it (set to NULL) */
    size_t body_len;
    int http_major, http_minor;
    bool keep_alive;
    char request_id[72];        /* X-Request-Id as sent (if sane) or generated */
    double t_start;             /* s (monotonic): first byte of the request */
    /* set by the handler for the access log (-1 / < 0: not shown) */
    int prompt_tokens, completion_tokens;
    double ttft;                /* s from t_start */
    /* the handler's */
    void *user;
    void (*on_abort)(srv_http_req *req, srv_abort_reason why);
    /* internal */
    struct srv_http_conn *conn;
    int status;                 /* sent status (0 before) */
    bool streaming, finished, chunked;
    char *arena;                /* url and header texts */
};

/* Header value by lower-case name, or NULL. */
const char *srv_http_req_header(const srv_http_req *req, const char *name);
void srv_http_req_free(srv_http_req *req);

/* ---- the parser ---------------------------------------------------------- */

typedef enum { SRV_PARSE_MORE, SRV_PARSE_REQUEST, SRV_PARSE_ERROR } srv_parse_result;

typedef struct {
    llhttp_t p;
    llhttp_settings_t settings;
    srv_http_limits lim;
    srv_http_req *req;          /* the request being read (NULL between requests) */
    srv_http_req *done;         /* a complete request not yet taken */
    char *arena;                /* (arena_len) url\0 name\0 value\0 ... */
    size_t arena_len, arena_cap;
    size_t *offs;               /* (n_offs) arena offsets: url, then name, value pairs */
    int n_offs, cap_offs;
    bool in_field, in_value;
    size_t header_bytes;
    size_t body_cap;
    bool expect_continue;       /* the request asked for "100 Continue" */
    bool paused;
    int err_status;             /* the status of the error (400, 413, 431) */
    char err_msg[160];
} srv_http_parser;

void srv_http_parser_init(srv_http_parser *ps, const srv_http_limits *lim);
void srv_http_parser_free(srv_http_parser *ps);
/* Parses data[0, len); *used: bytes consumed. MORE: all consumed, the request
 * (if any) is incomplete. REQUEST: a request is complete (take it; feed the
 * rest, data + *used, when done with it). ERROR: err_status and err_msg say
 * why; the connection cannot be read further. */
srv_parse_result srv_http_parser_feed(srv_http_parser *ps, const char *data, size_t len, size_t *used);
/* The complete request (the caller owns it); NULL if none. */
srv_http_req *srv_http_parser_take(srv_http_parser *ps);
/* Whether a request has begun but is not complete. */
bool srv_http_parser_busy(const srv_http_parser *ps);

/* ---- the server ---------------------------------------------------------- */

typedef struct srv_http srv_http;
typedef void (*srv_http_handler)(srv_http_req *req, void *ctx);

typedef struct {
    uint64_t connections_total;
    int connections_open;
    uint64_t requests_total;
    uint64_t responses[6];      /* by class: [1] 1xx .. [5] 5xx; [0] aborted */
    uint64_t rejected_connections;
} srv_http_stats;

/* Creates the server on loop (not listening yet). */
srv_http *srv_http_create(uv_loop_t *loop, const srv_http_limits *lim, srv_http_handler handler, void *ctx);
/* Binds host:port and listens. Returns 0, or a libuv error with a message. */
int srv_http_listen(srv_http *h, const char *host, int port, char *err, size_t errlen);
/* The port listened on (useful with port 0). */
int srv_http_port(const srv_http *h);
/* Stops accepting and closes idle connections; in-flight requests go on and
 * their connections close when they finish. on_drained runs once no
 * connection is left. */
void srv_http_drain(srv_http *h, void (*on_drained)(srv_http *h, void *ctx));
/* Aborts every in-flight request with SHUTDOWN (the grace period is over). */
void srv_http_abort_all(srv_http *h);
/* Frees the server; call after on_drained (or with no connection open). */
void srv_http_destroy(srv_http *h);
void srv_http_stats_get(const srv_http *h, srv_http_stats *s);

/* ---- responses ----------------------------------------------------------- */

/* A whole response with Content-Length. extra: more header lines, each ending
 * in "\r\n" (or NULL). Finishes the request. Returns 0, or -1 if the
 * connection is gone (the request is finished anyway). */
int srv_http_respond(srv_http_req *req, int status, const char *content_type, const char *body, size_t len,
                     const char *extra);
/* A JSON error reply {"error": ...} with e's status (see api/openai.h). */
int srv_http_respond_error(srv_http_req *req, const api_error *e, const char *extra);
/* Begins a streamed response (chunked on HTTP/1.1; on HTTP/1.0 the body runs
 * to the connection's close). */
int srv_http_stream_begin(srv_http_req *req, int status, const char *content_type, const char *extra);
/* Sends data as one chunk. -1 if the connection is gone or hopelessly behind
 * (the abort callback follows from the loop). */
int srv_http_stream_write(srv_http_req *req, const char *data, size_t len);
/* Ends the stream and finishes the request. */
void srv_http_stream_end(srv_http_req *req);

/* Standard reason phrase of a status ("Not Found"). */
const char *srv_http_status_text(int status);

#endif
