/* test_http.c: tests for the socket-free part of server/http.c: the
 * request parser. Inputs are raw HTTP/1.1 bytes written from RFC 9112
 * (message syntax, chunked coding §7.1, persistence §9.3) and RFC 9110
 * (Expect: 100-continue §10.1.1); each test checks what a server must see:
 * method, target, header names (case-insensitive, kept lower-case), body
 * after de-chunking, keep-alive, and the status of each refusal (400, 413,
 * 431). Feeding the same bytes one at a time must give the same result. */
#include <criterion/criterion.h>

#include <string.h>

#include "server/http.h"

static const srv_http_limits lim = {
    .max_header_bytes = 1024, .max_body_bytes = 64, .max_connections = 8, .idle_timeout = 1, .request_timeout = 1,
};

/* Parses all of data, one byte at a time when bytewise; returns the requests
 * (up to 4) and the final result. */
static srv_parse_result parse_all(const char *data, size_t len, bool bytewise, srv_http_req **reqs, int *n,
                                  srv_http_parser *ps) {
    srv_http_parser_init(ps, &lim);
    *n = 0;
    srv_parse_result r = SRV_PARSE_MORE;
    size_t at = 0;
    while (at < len) {
        size_t step = bytewise ? 1 : len - at, used = 0;
        r = srv_http_parser_feed(ps, data + at, step, &used);
        at += used;
        if (r == SRV_PARSE_ERROR)
            return r;
        if (r == SRV_PARSE_REQUEST) {
            cr_assert_lt(*n, 4);
            reqs[(*n)++] = srv_http_parser_take(ps);
        }
    }
    return r;
}

static void free_all(srv_http_req **reqs, int n, srv_http_parser *ps) {
    for (int i = 0; i < n; i++)
        srv_http_req_free(reqs[i]);
    srv_http_parser_free(ps);
}

static void both_ways(const char *data, void (*check)(srv_http_req **reqs, int n)) {
    for (int bytewise = 0; bytewise < 2; bytewise++) {
        srv_http_parser ps;
        srv_http_req *reqs[4];
        int n;
        srv_parse_result r = parse_all(data, strlen(data), bytewise, reqs, &n, &ps);
        cr_assert_neq(r, SRV_PARSE_ERROR, "bytewise %d: %s", bytewise, ps.err_msg);
        check(reqs, n);
        free_all(reqs, n, &ps);
    }
}

static void check_get(srv_http_req **reqs, int n) {
    cr_assert_eq(n, 1);
    srv_http_req *q = reqs[0];
    cr_assert_str_eq(q->method, "GET");
    cr_assert_str_eq(q->url, "/v1/models?x=1");
    cr_assert_eq(q->path_len, 10);
    cr_assert_eq(q->n_headers, 3);
    cr_assert_str_eq(srv_http_req_header(q, "host"), "localhost:8080");
    cr_assert_str_eq(srv_http_req_header(q, "x-request-id"), "Abc-1");
    cr_assert_str_eq(srv_http_req_header(q, "x-empty"), "");
    cr_assert_null(srv_http_req_header(q, "Host"), "names are stored lower-case");
    cr_assert(q->keep_alive, "HTTP/1.1 persists by default");
    cr_assert_eq(q->http_minor, 1);
    cr_assert_eq(q->body_len, 0);
    cr_assert_not_null(q->body);
}

Test(parser, get_with_headers) {
    both_ways("GET /v1/models?x=1 HTTP/1.1\r\nHost: localhost:8080\r\nX-REQUEST-ID: Abc-1\r\nX-Empty:\r\n\r\n", check_get);
}

static void check_post(srv_http_req **reqs, int n) {
    cr_assert_eq(n, 1);
    cr_assert_str_eq(reqs[0]->method, "POST");
    cr_assert_eq(reqs[0]->body_len, 13);
    cr_assert_str_eq(reqs[0]->body, "{\"prompt\":1}\n");
}

Test(parser, content_length_body) {
    both_ways("POST /v1/completions HTTP/1.1\r\nContent-Length: 13\r\nContent-Type: application/json\r\n\r\n"
              "{\"prompt\":1}\n",
              check_post);
}

static void check_chunked(srv_http_req **reqs, int n) {
    cr_assert_eq(n, 1);
    cr_assert_eq(reqs[0]->body_len, 23);
    cr_assert_str_eq(reqs[0]->body, "Wikipedia in\r\n\r\nchunks.");
}

Test(parser, chunked_body) {
    /* the chunked example of RFC 9112's predecessor, with a chunk extension and a trailer */
    both_ways("POST /tokenize HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
              "4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n",
              check_chunked);
}

static void check_pipelined(srv_http_req **reqs, int n) {
    cr_assert_eq(n, 3);
    cr_assert_str_eq(reqs[0]->url, "/health");
    cr_assert_str_eq(reqs[1]->url, "/tokenize");
    cr_assert_str_eq(reqs[1]->body, "abc");
    cr_assert_str_eq(reqs[2]->url, "/metrics");
    cr_assert(!reqs[2]->keep_alive, "Connection: close ends persistence");
}

Test(parser, pipelined_requests) {
    both_ways("GET /health HTTP/1.1\r\n\r\nPOST /tokenize HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
              "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
              check_pipelined);
}

Test(parser, request_stops_the_parser) {
    srv_http_parser ps;
    srv_http_parser_init(&ps, &lim);
    const char *two = "GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
    size_t used;
    cr_assert_eq(srv_http_parser_feed(&ps, two, strlen(two), &used), SRV_PARSE_REQUEST);
    cr_assert_eq(used, 19, "consumed exactly the first request");
    cr_assert(!srv_http_parser_busy(&ps));
    cr_assert_eq(srv_http_parser_feed(&ps, two + used, strlen(two) - used, &used), SRV_PARSE_REQUEST,
                 "a request not taken is still reported");
    cr_assert_eq(used, 0);
    srv_http_req *a = srv_http_parser_take(&ps);
    cr_assert_str_eq(a->url, "/a");
    cr_assert_eq(srv_http_parser_feed(&ps, two + 19, strlen(two) - 19, &used), SRV_PARSE_REQUEST);
    srv_http_req *b = srv_http_parser_take(&ps);
    cr_assert_str_eq(b->url, "/b");
    cr_assert_null(srv_http_parser_take(&ps));
    srv_http_req_free(a);
    srv_http_req_free(b);
    srv_http_parser_free(&ps);
}

Test(parser, partial_is_busy) {
    srv_http_parser ps;
    srv_http_parser_init(&ps, &lim);
    size_t used;
    cr_assert_eq(srv_http_parser_feed(&ps, "GET /hea", 8, &used), SRV_PARSE_MORE);
    cr_assert_eq(used, 8);
    cr_assert(srv_http_parser_busy(&ps));
    srv_http_parser_free(&ps);
}

Test(parser, http10_persistence) {
    srv_http_parser ps;
    srv_http_req *reqs[4];
    int n;
    const char *a = "GET /health HTTP/1.0\r\n\r\n";
    parse_all(a, strlen(a), false, reqs, &n, &ps);
    cr_assert_eq(n, 1);
    cr_assert(!reqs[0]->keep_alive, "HTTP/1.0 closes by default");
    cr_assert_eq(reqs[0]->http_minor, 0);
    free_all(reqs, n, &ps);
    const char *b = "GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    parse_all(b, strlen(b), false, reqs, &n, &ps);
    cr_assert(reqs[0]->keep_alive);
    free_all(reqs, n, &ps);
}

Test(parser, expect_continue) {
    srv_http_parser ps;
    srv_http_parser_init(&ps, &lim);
    const char *h = "POST /tokenize HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n";
    size_t used;
    cr_assert_eq(srv_http_parser_feed(&ps, h, strlen(h), &used), SRV_PARSE_MORE);
    cr_assert(ps.expect_continue, "the body waits for 100 Continue");
    cr_assert_eq(srv_http_parser_feed(&ps, "{}", 2, &used), SRV_PARSE_REQUEST);
    srv_http_req *q = srv_http_parser_take(&ps);
    cr_assert_str_eq(q->body, "{}");
    srv_http_req_free(q);
    srv_http_parser_free(&ps);
}

static void expect_error(const char *data, int status, const char *words) {
    for (int bytewise = 0; bytewise < 2; bytewise++) {
        srv_http_parser ps;
        srv_http_req *reqs[4];
        int n;
        srv_parse_result r = parse_all(data, strlen(data), bytewise, reqs, &n, &ps);
        cr_assert_eq(r, SRV_PARSE_ERROR, "accepted: %s", data);
        cr_assert_eq(ps.err_status, status, "status %d for %s (%s)", ps.err_status, data, ps.err_msg);
        cr_assert(strstr(ps.err_msg, words), "'%s' lacks '%s'", ps.err_msg, words);
        size_t used;
        cr_assert_eq(srv_http_parser_feed(&ps, "GET / HTTP/1.1\r\n\r\n", 18, &used), SRV_PARSE_ERROR,
                     "an error is final");
        free_all(reqs, n, &ps);
    }
}

Test(parser, refusals) {
    char big[1400];
    snprintf(big, sizeof big, "GET / HTTP/1.1\r\nX-Big: %01100d\r\n\r\n", 0);
    expect_error(big, 431, "exceed 1024 bytes");
    expect_error("POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n", 413, "65 bytes");
    char chunked[256];
    snprintf(chunked, sizeof chunked, "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n28\r\n%040d\r\n28\r\n%040d\r\n0\r\n\r\n",
             0, 0);
    expect_error(chunked, 413, "limit of 64 bytes");
    expect_error("GARBAGE\r\n\r\n", 400, "malformed HTTP request");
    expect_error("GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400, "malformed");
    expect_error("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "malformed");
    expect_error("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed");
}

Test(parser, upgrade_is_ignored) {
    /* RFC 9110 §7.8: a server may ignore Upgrade; it answers in HTTP/1.1 and
     * closes, since what the client sends next is not HTTP */
    srv_http_parser ps;
    srv_http_req *reqs[4];
    int n;
    const char *a = "GET /health HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello";
    cr_assert_eq(parse_all(a, strlen(a), false, reqs, &n, &ps), SRV_PARSE_ERROR);
    cr_assert_eq(n, 1);
    cr_assert_str_eq(reqs[0]->url, "/health");
    cr_assert(!reqs[0]->keep_alive);
    free_all(reqs, n, &ps);
}

Test(parser, header_limit_counts_all_headers) {
    /* many small headers add up */
    char req[1600] = "GET / HTTP/1.1\r\n";
    for (int i = 0; i < 100; i++)
        strcat(req, "A: 1234567\r\n");
    strcat(req, "\r\n");
    expect_error(req, 431, "exceed");
}

Test(parser, status_texts) {
    cr_assert_str_eq(srv_http_status_text(413), "Payload Too Large");
    cr_assert_str_eq(srv_http_status_text(431), "Request Header Fields Too Large");
    cr_assert_str_eq(srv_http_status_text(503), "Service Unavailable");
}
