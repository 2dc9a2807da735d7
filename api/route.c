/* route.c: the daemon's one route table: (method, path) -> endpoint, and
 * which endpoints need the API key or carry a JSON body. The server maps
 * endpoints to handlers; the fuzzer uses the same table. */
#include "api/openai.h"

#include <string.h>

typedef struct {
    const char *method;
    const char *path;
    bool prefix;            /* path is a prefix followed by a non-empty id */
    api_endpoint ep;
    bool auth;
    bool body;
} api_route_entry;

static const api_route_entry routes[] = {
    {"GET", "/health", false, API_EP_HEALTH, false, false},
    {"GET", "/metrics", false, API_EP_METRICS, false, false},
    {"GET", "/v1/models", false, API_EP_MODELS, true, false},
    {"GET", "/v1/models/", true, API_EP_MODEL, true, false},
    {"POST", "/v1/completions", false, API_EP_COMPLETIONS, true, true},
    {"POST", "/v1/chat/completions", false, API_EP_CHAT, true, true},
    {"POST", "/tokenize", false, API_EP_TOKENIZE, true, true},
    {"POST", "/detokenize", false, API_EP_DETOKENIZE, true, true},
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

static bool path_matches(const api_route_entry *r, const char *path, size_t len) {
    size_t n = strlen(r->path);
    if (!r->prefix)
        return len == n && !memcmp(path, r->path, n);
    if (len <= n || memcmp(path, r->path, n))
        return false;
    return memchr(path + n, '/', len - n) == NULL;  /* one segment: the id */
}

api_endpoint api_route(const char *method, const char *path, size_t path_len,
                       const char **allow, api_error *e) {
    const api_route_entry *other = NULL;
    /* HEAD is GET without the body (RFC 9110 §9.3.2); the http layer drops it */
    const char *as = strcmp(method, "HEAD") ? method : "GET";
    for (size_t i = 0; i < N_ROUTES; i++) {
        if (!path_matches(&routes[i], path, path_len))
            continue;
        if (!strcmp(as, routes[i].method))
            return routes[i].ep;
        other = &routes[i];
    }
    int shown = path_len > 200 ? 200 : (int)path_len;
    if (other) {
        if (allow)
            *allow = other->method;
        api_error_set(e, 405, "method_not_allowed", "", "Method %s is not allowed for %.*s (use %s)",
                      method, shown, path, other->method);
    } else {
        api_error_set(e, 404, "not_found", "", "Invalid URL (%s %.*s)", method, shown, path);
    }
    return API_EP_NONE;
}

static const api_route_entry *entry(api_endpoint ep) {
    for (size_t i = 0; i < N_ROUTES; i++)
        if (routes[i].ep == ep)
            return &routes[i];
    return NULL;
}

bool api_endpoint_needs_auth(api_endpoint ep) {
    const api_route_entry *r = entry(ep);
    return r && r->auth;
}

bool api_endpoint_has_body(api_endpoint ep) {
    const api_route_entry *r = entry(ep);
    return r && r->body;
}

const char *api_endpoint_name(api_endpoint ep) {
    static const char *names[API_EP_COUNT] = {
        [API_EP_NONE] = "none", [API_EP_HEALTH] = "health", [API_EP_METRICS] = "metrics",
        [API_EP_MODELS] = "models", [API_EP_MODEL] = "model", [API_EP_COMPLETIONS] = "completions",
        [API_EP_CHAT] = "chat", [API_EP_TOKENIZE] = "tokenize", [API_EP_DETOKENIZE] = "detokenize",
    };
    return (unsigned)ep < API_EP_COUNT ? names[ep] : "none";
}
