/* test_route.c: tests for api/route.c: the route table answers each
 * (method, path) as DESIGN.md §5 lists the endpoints, with 404 for unknown
 * paths and 405 (plus the method to use) for a known path with another
 * method, as RFC 9110 §15.5.6 requires. */
#include <criterion/criterion.h>

#include <string.h>

#include "api/openai.h"

static api_endpoint route(const char *method, const char *path, const char **allow, api_error *e) {
    memset(e, 0, sizeof *e);
    return api_route(method, path, strlen(path), allow, e);
}

Test(route, endpoints) {
    static const struct {
        const char *method, *path;
        api_endpoint ep;
        bool auth, body;
    } cases[] = {
        {"GET", "/health", API_EP_HEALTH, false, false},
        {"GET", "/metrics", API_EP_METRICS, false, false},
        {"GET", "/v1/models", API_EP_MODELS, true, false},
        {"GET", "/v1/models/SmolLM2", API_EP_MODEL, true, false},
        {"POST", "/v1/completions", API_EP_COMPLETIONS, true, true},
        {"POST", "/v1/chat/completions", API_EP_CHAT, true, true},
        {"POST", "/tokenize", API_EP_TOKENIZE, true, true},
        {"POST", "/detokenize", API_EP_DETOKENIZE, true, true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        api_error e;
        api_endpoint ep = route(cases[i].method, cases[i].path, NULL, &e);
        cr_assert_eq(ep, cases[i].ep, "%s %s", cases[i].method, cases[i].path);
        cr_assert_eq(api_endpoint_needs_auth(ep), cases[i].auth, "%s", cases[i].path);
        cr_assert_eq(api_endpoint_has_body(ep), cases[i].body, "%s", cases[i].path);
    }
}

Test(route, path_length_not_nul) {
    api_error e;
    /* the path is given with its length: what follows (a query) is not part of it */
    cr_assert_eq(api_route("GET", "/health?verbose=1", 7, NULL, &e), API_EP_HEALTH);
}

Test(route, not_found) {
    static const char *paths[] = {"/", "/v1", "/v1/model", "/v1/models/a/b", "/v1/models/", "/healthz",
                                  "/v1/completions/", "/V1/models", "//health"};
    for (size_t i = 0; i < sizeof paths / sizeof paths[0]; i++) {
        api_error e;
        const char *allow = NULL;
        cr_assert_eq(route("GET", paths[i], &allow, &e), API_EP_NONE, "%s", paths[i]);
        cr_assert_eq(e.status, 404, "%s: %d", paths[i], e.status);
        cr_assert_null(allow);
        cr_assert(strstr(e.message, paths[i]), "%s", e.message);
        cr_assert_str_eq(e.type, "invalid_request_error");
    }
}

Test(route, method_not_allowed) {
    api_error e;
    const char *allow = NULL;
    cr_assert_eq(route("GET", "/v1/completions", &allow, &e), API_EP_NONE);
    cr_assert_eq(e.status, 405);
    cr_assert_str_eq(allow, "POST");
    cr_assert_str_eq(e.code, "method_not_allowed");
    cr_assert_eq(route("POST", "/health", &allow, &e), API_EP_NONE);
    cr_assert_eq(e.status, 405);
    cr_assert_str_eq(allow, "GET");
    cr_assert_eq(route("DELETE", "/v1/models/x", &allow, &e), API_EP_NONE);
    cr_assert_eq(e.status, 405);
}

Test(route, head_is_get) {
    api_error e;
    const char *allow = NULL;
    cr_assert_eq(route("HEAD", "/health", &allow, &e), API_EP_HEALTH);
    cr_assert_eq(route("HEAD", "/v1/models", &allow, &e), API_EP_MODELS);
    cr_assert_eq(route("HEAD", "/v1/completions", &allow, &e), API_EP_NONE);
    cr_assert_eq(e.status, 405);
}

Test(route, names) {
    cr_assert_str_eq(api_endpoint_name(API_EP_CHAT), "chat");
    cr_assert_str_eq(api_endpoint_name((api_endpoint)99), "none");
}
