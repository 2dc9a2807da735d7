/* fuzz_http.c: libFuzzer target (make fuzz) for everything the daemon does
 * with bytes from the network before the engine sees them: HTTP/1.1 parsing
 * (server/http.c's parser, fed in pieces whose size the input's first byte
 * picks, so incremental parsing is exercised), routing (api/route.c), JSON
 * validation of each POST body (api/request.c) and the error and reply
 * rendering that follows (api/response.c). A crash, a sanitizer report or a
 * leak is a finding. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "api/openai.h"
#include "server/http.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void handle(srv_http_req *req) {
    api_error e;
    const char *allow = NULL;
    srv_http_req_header(req, "x-request-id");
    api_endpoint ep = api_route(req->method, req->url, req->path_len, &allow, &e);
    size_t len;
    char *out;
    if (ep == API_EP_NONE) {
        out = api_error_json(&e, &len);
        free(out);
        return;
    }
    if (!api_endpoint_has_body(ep))
        return;
    api_request r;
    if (api_request_parse(ep, req->body, req->body_len, 49152, &r, &e)) {
        out = api_error_json(&e, &len);
        free(out);
        return;
    }
    /* render what a reply to this request would carry: its prompt text and
     * the raw body (not valid UTF-8 in general) as generated text */
    api_reply_meta m = {ep == API_EP_CHAT ? API_EP_CHAT : API_EP_COMPLETIONS, "cmpl-fuzz", 0,
                        r.model ? r.model : "m", r.logprobs};
    api_choice c;
    memset(&c, 0, sizeof c);
    if (r.n_prompts > 0 && r.prompts[0].text)
        api_choice_append(&c, r.prompts[0].text, r.prompts[0].text_len);
    api_choice_add_logprob(&c, req->body, req->body_len < 64 ? req->body_len : 64, -1.0f);
    out = api_render_reply(&m, &c, 1, 1, 1, &len);
    free(out);
    api_chunk_logprob lp = {req->body, req->body_len < 16 ? req->body_len : 16, -0.5f, 0};
    out = api_render_chunk(&m, 0, true, req->body, req->body_len, &lp, ENG_FINISH_STOP, r.include_usage, &len);
    free(out);
    api_choice_free(&c);
    api_request_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0)
        return 0;
    static const srv_http_limits lim = {
        .max_header_bytes = 2048, .max_body_bytes = 16384, .max_connections = 1, .idle_timeout = 1,
        .request_timeout = 1,
    };
    size_t stride = data[0] % 8 == 0 ? size : (size_t)(data[0] % 8) * 7;
    const char *p = (const char *)data + 1;
    size_t left = size - 1;
    srv_http_parser ps;
    srv_http_parser_init(&ps, &lim);
    while (left > 0) {
        size_t piece = left < stride ? left : stride, used = 0;
        srv_parse_result res = srv_http_parser_feed(&ps, p, piece, &used);
        if (res == SRV_PARSE_ERROR)
            break;
        if (res == SRV_PARSE_REQUEST) {
            srv_http_req *req = srv_http_parser_take(&ps);
            handle(req);
            srv_http_req_free(req);
        }
        p += used;
        left -= used;
    }
    srv_http_parser_free(&ps);
    return 0;
}
