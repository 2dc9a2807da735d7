/* http.c: HTTP/1.1 over libuv with llhttp (see http.h for the contract).
 *
 * One connection reads one request at a time: llhttp is paused at the end of
 * each message, bytes that arrive while a request is in flight (pipelining)
 * wait in the connection's input buffer, and reading goes on meanwhile so a
 * client that hangs up is seen at once (and its request aborted). A single
 * timer per connection enforces whichever limit applies to its state: idle
 * keep-alive, receiving a request, or the request's total time. */
#include "server/http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

/* ---- requests ------------------------------------------------------------ */

const char *srv_http_req_header(const srv_http_req *req, const char *name) {
    for (int i = 0; i < req->n_headers; i++)
        if (!strcmp(req->headers[i].name, name))
            return req->headers[i].value;
    return NULL;
}

void srv_http_req_free(srv_http_req *req) {
    if (!req)
        return;
    free(req->headers);
    free(req->body);
    free(req->arena);
    free(req);
}

const char *srv_http_status_text(int status) {
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    default: return status < 300 ? "OK" : status < 500 ? "Bad Request" : "Internal Server Error";
    }
}

/* ---- the parser ---------------------------------------------------------- */

static srv_http_parser *parser_of(llhttp_t *p) { return (srv_http_parser *)p->data; }

static int fail(srv_http_parser *ps, int status, const char *msg) {
    if (!ps->err_status) {
        ps->err_status = status;
        snprintf(ps->err_msg, sizeof ps->err_msg, "%s", msg);
    }
    return -1;
}

static int arena_put(srv_http_parser *ps, const char *at, size_t len, bool lower) {
    if (ps->arena_len + len + 1 > ps->arena_cap) {
        size_t cap = ps->arena_cap ? ps->arena_cap : 1024;
        while (cap < ps->arena_len + len + 1)
            cap *= 2;
        char *a = realloc(ps->arena, cap);
        if (!a)
            return fail(ps, 500, "out of memory");
        ps->arena = a;
        ps->arena_cap = cap;
    }
    for (size_t i = 0; i < len; i++) {
        char ch = at[i];
        ps->arena[ps->arena_len++] = lower && ch >= 'A' && ch <= 'Z' ? (char)(ch + 32) : ch;
    }
    return 0;
}

static int push_off(srv_http_parser *ps, size_t off) {
    if (ps->n_offs == ps->cap_offs) {
        int cap = ps->cap_offs ? 2 * ps->cap_offs : 32;
        size_t *o = realloc(ps->offs, (size_t)cap * sizeof *o);
        if (!o)
            return fail(ps, 500, "out of memory");
        ps->offs = o;
        ps->cap_offs = cap;
    }
    ps->offs[ps->n_offs++] = off;
    return 0;
}

static int count_header_bytes(srv_http_parser *ps, size_t n) {
    ps->header_bytes += n;
    if (ps->header_bytes > ps->lim.max_header_bytes) {
        char msg[96];
        snprintf(msg, sizeof msg, "request line and headers exceed %zu bytes", ps->lim.max_header_bytes);
        return fail(ps, 431, msg);
    }
    return 0;
}

static int on_message_begin(llhttp_t *p) {
    srv_http_parser *ps = parser_of(p);
    srv_http_req_free(ps->req);
    ps->req = calloc(1, sizeof *ps->req);
    if (!ps->req)
        return fail(ps, 500, "out of memory");
    ps->arena_len = 0;
    ps->n_offs = 0;
    ps->in_field = ps->in_value = false;
    ps->header_bytes = 0;
    ps->body_cap = 0;
    ps->expect_continue = false;
    return push_off(ps, 0);  /* the url starts the arena */
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
    srv_http_parser *ps = parser_of(p);
    return count_header_bytes(ps, len) ? -1 : arena_put(ps, at, len, false);
}

static int on_url_complete(llhttp_t *p) { return arena_put(parser_of(p), "", 1, false); }

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
    srv_http_parser *ps = parser_of(p);
    if (!ps->in_field) {
        if (push_off(ps, ps->arena_len))
            return -1;
        ps->in_field = true;
    }
    return count_header_bytes(ps, len) ? -1 : arena_put(ps, at, len, true);
}

/* RFC 9110 §5.1: field-name = token. */
static bool is_token(const char *s, size_t n) {
    if (n == 0)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              (ch && strchr("!#$%&'*+-.^_`|~", ch))))
            return false;
    }
    return true;
}

static int on_header_field_complete(llhttp_t *p) {
    srv_http_parser *ps = parser_of(p);
    if (!ps->in_field && push_off(ps, ps->arena_len))
        return -1;
    ps->in_field = false;
    size_t start = ps->offs[ps->n_offs - 1];
    if (!is_token(ps->arena + start, ps->arena_len - start))
        return fail(ps, 400, "malformed HTTP request: invalid header name");
    return count_header_bytes(ps, 4) ? -1 : arena_put(ps, "", 1, false);  /* ": " and CRLF */
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
    srv_http_parser *ps = parser_of(p);
    if (!ps->in_value) {
        if (push_off(ps, ps->arena_len))
            return -1;
        ps->in_value = true;
    }
    return count_header_bytes(ps, len) ? -1 : arena_put(ps, at, len, false);
}

static int on_header_value_complete(llhttp_t *p) {
    srv_http_parser *ps = parser_of(p);
    if (!ps->in_value && push_off(ps, ps->arena_len))  /* an empty value */
        return -1;
    ps->in_value = false;
    return arena_put(ps, "", 1, false);
}

static int on_headers_complete(llhttp_t *p) {
    srv_http_parser *ps = parser_of(p);
    srv_http_req *req = ps->req;
    if (ps->n_offs % 2 == 0 || ps->arena_len == 0)  /* url + (name, value) pairs */
        return fail(ps, 400, "malformed header block");
    req->arena = malloc(ps->arena_len);
    req->n_headers = (ps->n_offs - 1) / 2;
    req->headers = malloc((size_t)(req->n_headers ? req->n_headers : 1) * sizeof *req->headers);
    if (!req->arena || !req->headers)
        return fail(ps, 500, "out of memory");
    memcpy(req->arena, ps->arena, ps->arena_len);
    req->url = req->arena;
    req->path_len = strcspn(req->url, "?");
    for (int i = 0; i < req->n_headers; i++) {
        req->headers[i].name = req->arena + ps->offs[1 + 2 * i];
        req->headers[i].value = req->arena + ps->offs[2 + 2 * i];
    }
    req->method = llhttp_method_name((llhttp_method_t)llhttp_get_method(p));
    req->http_major = llhttp_get_http_major(p);
    req->http_minor = llhttp_get_http_minor(p);
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > ps->lim.max_body_bytes) {
        char msg[128];
        snprintf(msg, sizeof msg, "request body of %llu bytes exceeds the limit of %zu bytes",
                 (unsigned long long)p->content_length, ps->lim.max_body_bytes);
        return fail(ps, 413, msg);
    }
    const char *expect = srv_http_req_header(req, "expect");
    if (expect && !strcasecmp(expect, "100-continue"))
        ps->expect_continue = true;
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
    srv_http_parser *ps = parser_of(p);
    srv_http_req *req = ps->req;
    if (req->body_len + len > ps->lim.max_body_bytes) {
        char msg[96];
        snprintf(msg, sizeof msg, "request body exceeds the limit of %zu bytes", ps->lim.max_body_bytes);
        return fail(ps, 413, msg);
    }
    if (req->body_len + len + 1 > ps->body_cap) {
        size_t cap = ps->body_cap ? ps->body_cap : 4096;
        while (cap < req->body_len + len + 1)
            cap *= 2;
        char *b = realloc(req->body, cap);
        if (!b)
            return fail(ps, 500, "out of memory");
        req->body = b;
        ps->body_cap = cap;
    }
    memcpy(req->body + req->body_len, at, len);
    req->body_len += len;
    return 0;
}

static int on_message_complete(llhttp_t *p) {
    srv_http_parser *ps = parser_of(p);
    srv_http_req *req = ps->req;
    if (!req->body && !(req->body = calloc(1, 1)))
        return fail(ps, 500, "out of memory");
    req->body[req->body_len] = 0;
    req->keep_alive = llhttp_should_keep_alive(p) && !llhttp_get_upgrade(p);
    ps->done = req;
    ps->req = NULL;
    return HPE_PAUSED;
}

void srv_http_parser_init(srv_http_parser *ps, const srv_http_limits *lim) {
    memset(ps, 0, sizeof *ps);
    ps->lim = *lim;
    llhttp_settings_init(&ps->settings);
    ps->settings.on_message_begin = on_message_begin;
    ps->settings.on_url = on_url;
    ps->settings.on_url_complete = on_url_complete;
    ps->settings.on_header_field = on_header_field;
    ps->settings.on_header_field_complete = on_header_field_complete;
    ps->settings.on_header_value = on_header_value;
    ps->settings.on_header_value_complete = on_header_value_complete;
    ps->settings.on_headers_complete = on_headers_complete;
    ps->settings.on_body = on_body;
    ps->settings.on_message_complete = on_message_complete;
    llhttp_init(&ps->p, HTTP_REQUEST, &ps->settings);
    ps->p.data = ps;
}

void srv_http_parser_free(srv_http_parser *ps) {
    srv_http_req_free(ps->req);
    srv_http_req_free(ps->done);
    free(ps->arena);
    free(ps->offs);
    memset(ps, 0, sizeof *ps);
}

srv_parse_result srv_http_parser_feed(srv_http_parser *ps, const char *data, size_t len, size_t *used) {
    *used = 0;
    if (ps->err_status)
        return SRV_PARSE_ERROR;
    if (ps->done)
        return SRV_PARSE_REQUEST;
    if (ps->paused) {
        llhttp_resume(&ps->p);
        ps->paused = false;
    }
    llhttp_errno_t rc = llhttp_execute(&ps->p, data, len);
    if (rc == HPE_OK) {
        *used = len;
        return SRV_PARSE_MORE;
    }
    if ((rc == HPE_PAUSED || rc == HPE_PAUSED_UPGRADE) && ps->done) {
        *used = (size_t)(llhttp_get_error_pos(&ps->p) - data);
        ps->paused = true;
        if (rc == HPE_PAUSED_UPGRADE) {
            /* no protocol switch here: what follows is not HTTP we can read */
            ps->done->keep_alive = false;
            ps->err_status = 400;
            snprintf(ps->err_msg, sizeof ps->err_msg, "protocol upgrades are not supported");
        }
        return SRV_PARSE_REQUEST;
    }
    if (!ps->err_status) {
        ps->err_status = 400;
        snprintf(ps->err_msg, sizeof ps->err_msg, "malformed HTTP request: %s (%s)",
                 llhttp_get_error_reason(&ps->p) ? llhttp_get_error_reason(&ps->p) : "parse error",
                 llhttp_errno_name(rc));
    }
    return SRV_PARSE_ERROR;
}

srv_http_req *srv_http_parser_take(srv_http_parser *ps) {
    srv_http_req *r = ps->done;
    ps->done = NULL;
    return r;
}

bool srv_http_parser_busy(const srv_http_parser *ps) { return ps->req != NULL; }

/* ---- connections --------------------------------------------------------- */

typedef struct srv_http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shut;
    srv_http *h;
    srv_http_parser ps;
    srv_http_req *req;          /* in flight */
    char *in;                   /* (in_len) bytes received, not parsed yet */
    size_t in_len, in_cap;
    double t_first_byte;        /* of the request being read */
    int open_handles;
    uint64_t n_dispatched;      /* requests dispatched on this connection */
    bool closing, shutting, continue_sent, read_stopped, in_process, overflow;
    struct srv_http_conn *prev, *next;
} srv_http_conn;

struct srv_http {
    uv_loop_t *loop;
    uv_tcp_t listener;
    bool listening, listener_open;
    srv_http_limits lim;
    srv_http_handler handler;
    void *ctx;
    srv_http_conn *conns;
    srv_http_stats stats;
    bool draining, drained_called;
    void (*on_drained)(srv_http *h, void *ctx);
    int port;
    uint64_t id_seed, id_counter;
    /* access log lines of this loop iteration, written at its end (a write
     * per request would cost a third of the /health throughput) */
    uv_check_t log_check;
    bool log_check_open;
    size_t log_len;
    char log_buf[32768];
    char readbuf[65536];
};

typedef struct {
    uv_write_t w;
    srv_http_conn *c;
    char data[];
} write_req;

static double now_s(void) { return (double)uv_hrtime() * 1e-9; }

static void conn_close(srv_http_conn *c);
static void conn_shutdown(srv_http_conn *c);
static void process(srv_http_conn *c, const char *data, size_t len);

static void on_write(uv_write_t *w, int status) {
    write_req *wr = (write_req *)w;
    srv_http_conn *c = wr->c;
    free(wr);
    if (status < 0 && status != UV_ECANCELED)
        conn_close(c);  /* the client is gone */
}

/* Writes a and b as one buffer. */
static int conn_write(srv_http_conn *c, const char *a, size_t alen, const char *b, size_t blen) {
    if (c->closing)
        return -1;
    write_req *wr = malloc(sizeof *wr + alen + blen);
    if (!wr)
        return -1;
    wr->c = c;
    memcpy(wr->data, a, alen);
    if (blen)
        memcpy(wr->data + alen, b, blen);
    uv_buf_t buf = uv_buf_init(wr->data, (unsigned)(alen + blen));
    if (uv_write(&wr->w, (uv_stream_t *)&c->tcp, &buf, 1, on_write)) {
        free(wr);
        return -1;
    }
    return 0;
}

static void on_timer(uv_timer_t *t);
static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);
static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* Arms the timer for the connection's state: the request's total time while
 * one is in flight, the time to receive a request once its first byte came,
 * else the keep-alive idle time. */
static void conn_arm(srv_http_conn *c) {
    if (c->closing)
        return;
    const srv_http_limits *lim = &c->h->lim;
    double deadline;
    if (c->req)
        deadline = c->req->t_start + lim->request_timeout;
    else if (srv_http_parser_busy(&c->ps))
        deadline = c->t_first_byte + lim->idle_timeout;
    else
        deadline = now_s() + lim->idle_timeout;
    double wait_ms = (deadline - now_s()) * 1e3;
    uv_timer_start(&c->timer, on_timer, wait_ms > 0 ? (uint64_t)wait_ms + 1 : 0, 0);
}

/* ---- access log ---------------------------------------------------------- */

static void log_flush(srv_http *h) {
    if (h->log_len) {
        fwrite(h->log_buf, 1, h->log_len, stderr);
        h->log_len = 0;
    }
}

static void on_log_check(uv_check_t *check) { log_flush(check->data); }

static void access_log(srv_http *h, const char *method, const char *url, int status, const srv_http_req *req) {
    char path[256];
    size_t n = 0;
    for (const char *p = url; *p && n < sizeof path - 1; p++)
        path[n++] = (*p > 32 && *p < 127) ? *p : '?';
    path[n] = 0;
    char tok[96] = "", ttft[32] = "", total[32] = "";
    if (req && (req->prompt_tokens >= 0 || req->completion_tokens >= 0))
        snprintf(tok, sizeof tok, " prompt_tokens=%d completion_tokens=%d",
                 req->prompt_tokens < 0 ? 0 : req->prompt_tokens, req->completion_tokens < 0 ? 0 : req->completion_tokens);
    if (req && req->ttft >= 0)
        snprintf(ttft, sizeof ttft, " ttft=%.4fs", req->ttft);
    if (req)
        snprintf(total, sizeof total, " total=%.4fs", now_s() - req->t_start);
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char line[768];
    int len = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02dZ access %s %s %d%s%s%s request_id=%s\n",
                       tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, method,
                       path[0] ? path : "-", status, tok, ttft, total, req ? req->request_id : "-");
    if (len <= 0)
        return;
    size_t n_line = (size_t)len < sizeof line ? (size_t)len : sizeof line - 1;
    if (h->log_len + n_line > sizeof h->log_buf)
        log_flush(h);
    memcpy(h->log_buf + h->log_len, line, n_line);
    h->log_len += n_line;
    if (!h->log_check_open)
        log_flush(h);
}

/* ---- connection life ----------------------------------------------------- */

/* Once draining and nothing is open: the log is flushed and on_drained runs. */
static void check_drained(srv_http *h) {
    if (!h->draining || h->conns || h->listener_open || h->drained_called)
        return;
    h->drained_called = true;
    log_flush(h);
    if (h->log_check_open) {
        h->log_check_open = false;
        uv_close((uv_handle_t *)&h->log_check, NULL);
    }
    if (h->on_drained)
        h->on_drained(h, h->ctx);
}

static void on_handle_closed(uv_handle_t *handle) {
    srv_http_conn *c = handle->data;
    if (--c->open_handles > 0)
        return;
    srv_http *h = c->h;
    if (c->prev)
        c->prev->next = c->next;
    else
        h->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    h->stats.connections_open--;
    srv_http_parser_free(&c->ps);
    free(c->in);
    free(c);
    check_drained(h);
}

static void finish(srv_http_req *req, bool aborted);

/* Closes at once; an in-flight request is aborted (GONE). */
static void conn_close(srv_http_conn *c) {
    if (c->closing)
        return;
    c->closing = true;  /* from here on nothing is written */
    srv_http_req *req = c->req;
    if (req) {
        if (req->on_abort)
            req->on_abort(req, SRV_ABORT_GONE);
        if (c->req == req)
            finish(req, true);
    }
    uv_read_stop((uv_stream_t *)&c->tcp);
    uv_close((uv_handle_t *)&c->tcp, on_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_handle_closed);
}

static void on_shutdown(uv_shutdown_t *s, int status) { conn_close(s->data); }

/* Closes once the queued writes are out. */
static void conn_shutdown(srv_http_conn *c) {
    if (c->closing || c->shutting)
        return;
    c->shutting = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->shut.data = c;
    if (uv_shutdown(&c->shut, (uv_stream_t *)&c->tcp, on_shutdown))
        conn_close(c);
    else
        conn_arm(c);  /* a client that never reads still goes after the idle time */
}

/* A response written by this layer itself (parse errors, limits, timeouts),
 * outside any handler; the connection closes after it. */
static void conn_error(srv_http_conn *c, int status, const char *code, const char *message, const char *extra) {
    api_error e;
    api_error_set(&e, status, code, "", "%s", message);
    size_t blen = 0;
    char *body = api_error_json(&e, &blen);
    char head[512];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                      "Connection: close\r\n%s\r\n",
                      status, srv_http_status_text(status), body ? blen : 0, extra ? extra : "");
    conn_write(c, head, (size_t)hl, body, body ? blen : 0);
    free(body);
    c->h->stats.responses[status / 100]++;
    access_log(c->h, "-", "-", status, NULL);
    conn_shutdown(c);
}

/* Ends the in-flight request: logs it, frees it, and keeps the connection
 * for the next request or closes it. */
static void finish(srv_http_req *req, bool aborted) {
    srv_http_conn *c = req->conn;
    srv_http *h = c->h;
    int status = aborted ? 499 : req->status;  /* nginx's "client closed request" */
    access_log(h, req->method, req->url, status, req);
    h->stats.responses[aborted ? 0 : status / 100 >= 1 && status / 100 <= 5 ? status / 100 : 5]++;
    bool keep = req->keep_alive && !aborted && !h->draining;
    req->finished = true;
    c->req = NULL;
    srv_http_req_free(req);
    if (c->closing)
        return;
    if (!keep) {
        conn_shutdown(c);
        return;
    }
    c->continue_sent = false;
    if (c->read_stopped) {
        c->read_stopped = false;
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    }
    conn_arm(c);
    if (!c->in_process && c->in_len) {
        char *buf = c->in;
        size_t len = c->in_len;
        c->in = NULL;
        c->in_len = c->in_cap = 0;
        process(c, buf, len);
        free(buf);
    }
}

static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* X-Request-Id as sent when it is short and plain, else a fresh one. */
static void set_request_id(srv_http *h, srv_http_req *req) {
    const char *id = srv_http_req_header(req, "x-request-id");
    size_t n = id ? strlen(id) : 0;
    bool ok = n > 0 && n <= 64;
    for (size_t i = 0; ok && i < n; i++) {
        char ch = id[i];
        ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || strchr("-_.:/+=", ch);
    }
    if (ok)
        memcpy(req->request_id, id, n + 1);
    else
        snprintf(req->request_id, sizeof req->request_id, "%016llx",
                 (unsigned long long)mix64(h->id_seed + h->id_counter++));
}

static void dispatch(srv_http_conn *c, srv_http_req *req) {
    srv_http *h = c->h;
    h->stats.requests_total++;
    req->conn = c;
    req->t_start = c->t_first_byte;
    req->prompt_tokens = req->completion_tokens = -1;
    req->ttft = -1;
    set_request_id(h, req);
    c->req = req;
    c->n_dispatched++;
    conn_arm(c);
    h->handler(req, h->ctx);
}

/* Parses and dispatches requests from data until one is in flight; keeps
 * what is left for later. */
static void process(srv_http_conn *c, const char *data, size_t len) {
    c->in_process = true;
    while (len > 0 && !c->req && !c->closing && !c->shutting) {
        if (!srv_http_parser_busy(&c->ps))
            c->t_first_byte = now_s();
        size_t used = 0;
        srv_parse_result r = srv_http_parser_feed(&c->ps, data, len, &used);
        data += used;
        len -= used;
        if (c->ps.expect_continue && !c->continue_sent && r != SRV_PARSE_ERROR) {
            static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
            conn_write(c, cont, sizeof cont - 1, NULL, 0);
            c->continue_sent = true;
        }
        if (r == SRV_PARSE_MORE) {
            conn_arm(c);
            break;
        }
        if (r == SRV_PARSE_REQUEST) {
            dispatch(c, srv_http_parser_take(&c->ps));
            continue;
        }
        int st = c->ps.err_status;
        conn_error(c, st, st == 413 ? "request_too_large" : st == 431 ? "request_header_fields_too_large" : NULL,
                   c->ps.err_msg, NULL);
        len = 0;
    }
    if (len > 0 && !c->closing && !c->shutting) {
        if (c->in_len + len > c->in_cap) {
            size_t cap = c->in_cap ? c->in_cap : 4096;
            while (cap < c->in_len + len)
                cap *= 2;
            char *b = realloc(c->in, cap);
            if (!b) {
                c->in_process = false;
                conn_close(c);
                return;
            }
            c->in = b;
            c->in_cap = cap;
        }
        memcpy(c->in + c->in_len, data, len);
        c->in_len += len;
    }
    c->in_process = false;
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf) {
    srv_http_conn *c = handle->data;
    *buf = uv_buf_init(c->h->readbuf, sizeof c->h->readbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    srv_http_conn *c = s->data;
    if (nread < 0) {
        conn_close(c);  /* EOF or error: an in-flight request is aborted */
        return;
    }
    if (nread == 0 || c->closing || c->shutting)
        return;
    if (c->req || c->in_len) {
        /* a request is in flight: keep the bytes (pipelining) and go on
         * reading to see a hang-up; stop reading when they pile up */
        if (c->in_len + (size_t)nread > c->in_cap) {
            size_t cap = c->in_cap ? c->in_cap : 4096;
            while (cap < c->in_len + (size_t)nread)
                cap *= 2;
            char *b = realloc(c->in, cap);
            if (!b) {
                conn_close(c);
                return;
            }
            c->in = b;
            c->in_cap = cap;
        }
        memcpy(c->in + c->in_len, buf->base, (size_t)nread);
        c->in_len += (size_t)nread;
        if (c->in_len > c->h->lim.max_header_bytes + c->h->lim.max_body_bytes + 65536) {
            uv_read_stop(s);
            c->read_stopped = true;
        }
        if (!c->req) {
            char *b = c->in;
            size_t len = c->in_len;
            c->in = NULL;
            c->in_len = c->in_cap = 0;
            process(c, b, len);
            free(b);
        }
        return;
    }
    process(c, buf->base, (size_t)nread);
}

static void on_timer(uv_timer_t *t) {
    srv_http_conn *c = t->data;
    if (c->closing)
        return;
    if (c->overflow || c->shutting) {
        conn_close(c);
        return;
    }
    srv_http_req *req = c->req;
    if (req) {
        uint64_t seq = c->n_dispatched;  /* finishing may dispatch a pipelined next request */
        if (req->on_abort)
            req->on_abort(req, SRV_ABORT_TIMEOUT);
        if (c->req == req && c->n_dispatched == seq && !req->streaming) {
            api_error e;
            api_error_set(&e, 504, "timeout", "", "the request took longer than %.0f s (request_timeout)",
                          c->h->lim.request_timeout);
            srv_http_respond_error(req, &e, NULL);
        }
        if (c->req == req && c->n_dispatched == seq)
            conn_close(c);
        return;
    }
    if (srv_http_parser_busy(&c->ps)) {
        char msg[96];
        snprintf(msg, sizeof msg, "the request was not received within %.0f s (idle_timeout)", c->h->lim.idle_timeout);
        conn_error(c, 408, "timeout", msg, NULL);
        return;
    }
    conn_close(c);  /* idle keep-alive connection */
}

static void on_connection(uv_stream_t *server, int status) {
    srv_http *h = server->data;
    if (status < 0)
        return;
    srv_http_conn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->h = h;
    uv_tcp_init(h->loop, &c->tcp);
    uv_timer_init(h->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    srv_http_parser_init(&c->ps, &h->lim);
    c->next = h->conns;
    if (h->conns)
        h->conns->prev = c;
    h->conns = c;
    h->stats.connections_open++;
    h->stats.connections_total++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp)) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (h->draining) {
        conn_close(c);
        return;
    }
    if (h->stats.connections_open > h->lim.max_connections) {
        h->stats.rejected_connections++;
        char msg[96];
        snprintf(msg, sizeof msg, "too many open connections (max_connections %d)", h->lim.max_connections);
        conn_error(c, 503, "overloaded", msg, "Retry-After: 1\r\n");
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    conn_arm(c);
}

/* ---- the server ---------------------------------------------------------- */

srv_http *srv_http_create(uv_loop_t *loop, const srv_http_limits *lim, srv_http_handler handler, void *ctx) {
    srv_http *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    h->loop = loop;
    h->lim = *lim;
    h->handler = handler;
    h->ctx = ctx;
    h->id_seed = mix64(uv_hrtime() ^ ((uint64_t)getpid() << 32));
    uv_check_init(loop, &h->log_check);
    h->log_check.data = h;
    uv_check_start(&h->log_check, on_log_check);
    uv_unref((uv_handle_t *)&h->log_check);  /* it must not keep the loop running */
    h->log_check_open = true;
    return h;
}

int srv_http_listen(srv_http *h, const char *host, int port, char *err, size_t errlen) {
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    uv_getaddrinfo_t gai;
    int rc = uv_getaddrinfo(h->loop, &gai, NULL, host, port_s, &hints);  /* synchronous: no callback */
    if (rc) {
        snprintf(err, errlen, "cannot resolve host '%s': %s", host, uv_strerror(rc));
        return rc;
    }
    uv_tcp_init(h->loop, &h->listener);
    h->listener.data = h;
    h->listener_open = true;
    rc = uv_tcp_bind(&h->listener, gai.addrinfo->ai_addr, 0);
    uv_freeaddrinfo(gai.addrinfo);
    if (!rc)
        rc = uv_listen((uv_stream_t *)&h->listener, 511, on_connection);
    if (rc) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, uv_strerror(rc));
        return rc;
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    h->port = port;
    if (!uv_tcp_getsockname(&h->listener, (struct sockaddr *)&ss, &len))
        h->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                           : ntohs(((struct sockaddr_in *)&ss)->sin_port);
    h->listening = true;
    return 0;
}

int srv_http_port(const srv_http *h) { return h->port; }

static void on_listener_closed(uv_handle_t *handle) {
    srv_http *h = handle->data;
    h->listener_open = false;
    check_drained(h);
}

void srv_http_drain(srv_http *h, void (*on_drained)(srv_http *h, void *ctx)) {
    if (h->draining)
        return;
    h->draining = true;
    h->on_drained = on_drained;
    if (h->listener_open) {
        h->listening = false;
        uv_close((uv_handle_t *)&h->listener, on_listener_closed);
    }
    for (srv_http_conn *c = h->conns, *next; c; c = next) {
        next = c->next;
        if (!c->req)
            conn_close(c);
    }
    check_drained(h);
}

void srv_http_abort_all(srv_http *h) {
    for (srv_http_conn *c = h->conns; c; c = c->next) {
        srv_http_req *req = c->req;
        if (!req || c->closing)
            continue;
        if (req->on_abort)
            req->on_abort(req, SRV_ABORT_SHUTDOWN);
        if (c->req == req)
            conn_close(c);
    }
}

void srv_http_destroy(srv_http *h) {
    if (!h)
        return;
    log_flush(h);
    free(h);
}

void srv_http_stats_get(const srv_http *h, srv_http_stats *s) { *s = h->stats; }

/* ---- responses ----------------------------------------------------------- */

/* The status line and common headers into buf; returns the length. */
static int head(const srv_http_req *req, int status, const char *ctype, const char *framing, const char *extra,
                char *buf, size_t cap) {
    const char *conn = !req->keep_alive ? "Connection: close\r\n"
                       : req->http_minor == 0 ? "Connection: keep-alive\r\n" : "";
    int n = snprintf(buf, cap, "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%sX-Request-Id: %s\r\n%s%s\r\n", status,
                     srv_http_status_text(status), ctype, framing, req->request_id, conn, extra ? extra : "");
    return n < 0 || (size_t)n >= cap ? -1 : n;
}

static void check_open(const srv_http_req *req) {
    if (req->finished || (req->conn && req->conn->req != req)) {
        fprintf(stderr, "http.c: response to a finished request\n");
        abort();
    }
}

int srv_http_respond(srv_http_req *req, int status, const char *content_type, const char *body, size_t len,
                     const char *extra) {
    check_open(req);
    srv_http_conn *c = req->conn;
    if (c->h->draining)
        req->keep_alive = false;
    char framing[48];
    snprintf(framing, sizeof framing, "Content-Length: %zu\r\n", len);
    char buf[2048];
    int n = head(req, status, content_type, framing, extra, buf, sizeof buf);
    req->status = status;
    int rc = n < 0 ? -1 : conn_write(c, buf, (size_t)n, body, strcmp(req->method, "HEAD") ? len : 0);
    finish(req, false);
    return rc;
}

int srv_http_respond_error(srv_http_req *req, const api_error *e, const char *extra) {
    size_t len = 0;
    char *body = api_error_json(e, &len);
    int rc = srv_http_respond(req, e->status, "application/json", body ? body : "", body ? len : 0, extra);
    free(body);
    return rc;
}

int srv_http_stream_begin(srv_http_req *req, int status, const char *content_type, const char *extra) {
    check_open(req);
    srv_http_conn *c = req->conn;
    req->chunked = req->http_major == 1 && req->http_minor >= 1;
    if (!req->chunked || c->h->draining)
        req->keep_alive = req->keep_alive && req->chunked && !c->h->draining;
    char buf[2048];
    int n = head(req, status, content_type,
                 req->chunked ? "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n" : "Cache-Control: no-cache\r\n",
                 extra, buf, sizeof buf);
    req->status = status;
    req->streaming = true;
    return n < 0 ? -1 : conn_write(c, buf, (size_t)n, NULL, 0);
}

int srv_http_stream_write(srv_http_req *req, const char *data, size_t len) {
    check_open(req);
    srv_http_conn *c = req->conn;
    if (c->closing || c->overflow || len == 0)
        return c->closing || c->overflow ? -1 : 0;
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) > ((size_t)16 << 20)) {
        c->overflow = true;  /* the client does not read: drop it from the loop */
        uv_timer_start(&c->timer, on_timer, 0, 0);
        return -1;
    }
    if (!req->chunked)
        return conn_write(c, data, len, NULL, 0);
    char size[24];
    int n = snprintf(size, sizeof size, "%zx\r\n", len);
    write_req *wr = malloc(sizeof *wr + (size_t)n + len + 2);
    if (!wr)
        return -1;
    wr->c = c;
    memcpy(wr->data, size, (size_t)n);
    memcpy(wr->data + n, data, len);
    memcpy(wr->data + n + len, "\r\n", 2);
    uv_buf_t buf = uv_buf_init(wr->data, (unsigned)((size_t)n + len + 2));
    if (uv_write(&wr->w, (uv_stream_t *)&c->tcp, &buf, 1, on_write)) {
        free(wr);
        return -1;
    }
    return 0;
}

void srv_http_stream_end(srv_http_req *req) {
    check_open(req);
    if (req->chunked)
        conn_write(req->conn, "0\r\n\r\n", 5, NULL, 0);
    finish(req, false);
}
