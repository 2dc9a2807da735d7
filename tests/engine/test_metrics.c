/* test_metrics.c: the metrics registry and its Prometheus text
 * (engine/metrics.c).
 *
 * The exposition is checked by Prometheus' own linter (promtool check metrics,
 * from the Debian package prometheus) and by the format's rules written out
 * here: every family has HELP and TYPE, buckets are cumulative with le="+Inf"
 * equal to _count. Values are checked against observations chosen so that the
 * expected bucket of each is known (le is inclusive). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/metrics.h"

static eng_metrics *make(const char *profile) {
    eng_metrics_info info = {
        .profile = profile, .block_size = 16, .k_codec = "int8", .v_codec = "f16",
        .pages_total = 1000, .bytes_per_token = 13824, .compression_ratio = 1.333,
        .n_capacity = 2, .capacity_ctx = {2048, 8192}, .capacity_seqs = {12, 3},
    };
    eng_metrics *m = eng_metrics_create(&info);
    cr_assert_not_null(m);
    return m;
}

static double value(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; *p;) {
        if (!strncmp(p, series, n) && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        const char *nl = strchr(p, '\n');
        if (!nl)
            break;
        p = nl + 1;
    }
    cr_assert_fail("series %s not in the exposition", series);
    return NAN;
}

Test(metrics, every_named_metric_has_help_and_type) {
    eng_metrics *m = make("laptop");
    char *t = eng_metrics_render(m);
    static const char *families[][2] = {
        {"kvserve_time_to_first_token_seconds", "histogram"},
        {"kvserve_inter_token_latency_seconds", "histogram"},
        {"kvserve_e2e_request_latency_seconds", "histogram"},
        {"kvserve_request_queue_time_seconds", "histogram"},
        {"kvserve_request_prefill_time_seconds", "histogram"},
        {"kvserve_request_decode_time_seconds", "histogram"},
        {"kvserve_prompt_tokens_total", "counter"},
        {"kvserve_generation_tokens_total", "counter"},
        {"kvserve_request_success_total", "counter"},
        {"kvserve_num_preemptions_total", "counter"},
        {"kvserve_num_requests_running", "gauge"},
        {"kvserve_num_requests_waiting", "gauge"},
        {"kvserve_kv_cache_usage_ratio", "gauge"},
        {"kvserve_kv_pages_total", "untyped"},
        {"kvserve_kv_pages_used", "gauge"},
        {"kvserve_kv_bytes_per_token", "gauge"},
        {"kvserve_kv_compression_ratio", "gauge"},
        {"kvserve_kv_capacity_sequences", "gauge"},
        {"kvserve_generation_tokens_per_second", "gauge"},
        {"kvserve_prompt_tokens_per_second", "gauge"},
        {"kvserve_cache_config_info", "gauge"},
    };
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
        char line[256];
        snprintf(line, sizeof line, "# TYPE %s %s\n", families[i][0], families[i][1]);
        cr_assert(strstr(t, line), "missing: %s", line);
        snprintf(line, sizeof line, "# HELP %s ", families[i][0]);
        cr_assert(strstr(t, line), "missing: %s", line);
    }
    cr_assert_eq(value(t, "kvserve_kv_pages_total"), 1000);
    cr_assert_eq(value(t, "kvserve_kv_bytes_per_token"), 13824);
    cr_assert_eq(value(t, "kvserve_kv_compression_ratio"), 1.333);
    cr_assert_eq(value(t, "kvserve_kv_capacity_sequences{context=\"2048\"}"), 12);
    cr_assert_eq(value(t, "kvserve_kv_capacity_sequences{context=\"8192\"}"), 3);
    cr_assert_eq(value(t, "kvserve_cache_config_info{profile=\"laptop\",block_size=\"16\",k_codec=\"int8\","
                          "v_codec=\"f16\"}"),
                 1);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_count"), 0);
    free(t);
    eng_metrics_destroy(m);
}

Test(metrics, histogram_buckets_cumulative_and_inclusive) {
    eng_metrics *m = make("");
    eng_metrics_begin(m);
    eng_metrics_observe(m, ENG_HIST_TTFT, 0.001);   /* on a bound: counts in le="0.001" */
    eng_metrics_observe(m, ENG_HIST_TTFT, 0.003);   /* le="0.005" */
    eng_metrics_observe(m, ENG_HIST_TTFT, 100.0);   /* le="160" */
    eng_metrics_observe(m, ENG_HIST_TTFT, 5000.0);  /* only +Inf */
    eng_metrics_observe(m, ENG_HIST_TTFT, -1.0);    /* ignored */
    eng_metrics_observe(m, ENG_HIST_ITL, 0.02);
    eng_metrics_end(m);
    char *t = eng_metrics_render(m);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_bucket{le=\"0.001\"}"), 1);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_bucket{le=\"0.005\"}"), 2);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_bucket{le=\"80\"}"), 2);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_bucket{le=\"160\"}"), 3);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_bucket{le=\"2560\"}"), 3);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_bucket{le=\"+Inf\"}"), 4);
    cr_assert_eq(value(t, "kvserve_time_to_first_token_seconds_count"), 4);
    cr_assert_float_eq(value(t, "kvserve_time_to_first_token_seconds_sum"), 5100.004, 1e-6);
    cr_assert_eq(value(t, "kvserve_inter_token_latency_seconds_bucket{le=\"0.01\"}"), 0);
    cr_assert_eq(value(t, "kvserve_inter_token_latency_seconds_bucket{le=\"0.025\"}"), 1);
    cr_assert_eq(value(t, "kvserve_e2e_request_latency_seconds_count"), 0);
    free(t);
    eng_metrics_destroy(m);
}

Test(metrics, counters_gauges_and_labels) {
    eng_metrics *m = make("my \"odd\" \\ profile");
    eng_metrics_begin(m);
    double now = eng_metrics_now();
    eng_metrics_add_tokens(m, 120, 7, now);
    eng_metrics_add_tokens(m, 0, 5, now);
    eng_metrics_add_request(m, ENG_FINISH_STOP);
    eng_metrics_add_request(m, ENG_FINISH_STOP);
    eng_metrics_add_request(m, ENG_FINISH_LENGTH);
    eng_metrics_add_request(m, ENG_FINISH_CANCELLED);
    eng_metrics_add_preemptions(m, 3);
    eng_metrics_set_load(m, 4, 9, 250);
    eng_metrics_end(m);
    char *t = eng_metrics_render(m);
    cr_assert_eq(value(t, "kvserve_prompt_tokens_total"), 120);
    cr_assert_eq(value(t, "kvserve_generation_tokens_total"), 12);
    cr_assert_eq(value(t, "kvserve_request_success_total{finish_reason=\"stop\"}"), 2);
    cr_assert_eq(value(t, "kvserve_request_success_total{finish_reason=\"length\"}"), 1);
    cr_assert_eq(value(t, "kvserve_request_success_total{finish_reason=\"cancelled\"}"), 1);
    cr_assert_eq(value(t, "kvserve_request_success_total{finish_reason=\"error\"}"), 0);
    cr_assert_eq(value(t, "kvserve_num_preemptions_total"), 3);
    cr_assert_eq(value(t, "kvserve_num_requests_running"), 4);
    cr_assert_eq(value(t, "kvserve_num_requests_waiting"), 9);
    cr_assert_eq(value(t, "kvserve_kv_pages_used"), 250);
    cr_assert_float_eq(value(t, "kvserve_kv_cache_usage_ratio"), 0.25, 1e-9);
    cr_assert(strstr(t, "profile=\"my \\\"odd\\\" \\\\ profile\""), "label not escaped:\n%s", t);
    free(t);
    eng_metrics_destroy(m);
}

/* Tokens/s over a 10 s window: tokens counted at `now` are in the rate until
 * 10 s later; right after start the rate divides by the time since start. */
Test(metrics, rolling_window_rate) {
    eng_metrics *m = make("");
    double t0 = eng_metrics_now();
    eng_metrics_begin(m);
    eng_metrics_add_tokens(m, 0, 40, t0 + 20.2);
    eng_metrics_add_tokens(m, 0, 60, t0 + 23.7);
    eng_metrics_add_tokens(m, 500, 0, t0 + 23.9);
    eng_metrics_end(m);
    double now = t0 + 25.0;
    char *t = eng_metrics_render_at(m, now);
    /* window: the 9 whole seconds before floor(now) and the current one */
    double span = now - (floor(now) - 9.0);
    cr_assert_float_eq(value(t, "kvserve_generation_tokens_per_second"), 100.0 / span, 1e-6);
    cr_assert_float_eq(value(t, "kvserve_prompt_tokens_per_second"), 500.0 / span, 1e-6);
    free(t);
    t = eng_metrics_render_at(m, t0 + 40.0); /* all older than 10 s */
    cr_assert_eq(value(t, "kvserve_generation_tokens_per_second"), 0);
    free(t);
    eng_metrics_destroy(m);
}

/* The structural rules of the text format, checked line by line. */
static void check_structure(const char *text) {
    char family[128] = "";
    char type[32] = "";
    double last_bucket = -1;
    const char *p = text;
    cr_assert(text[strlen(text) - 1] == '\n', "the exposition must end with a newline");
    while (*p) {
        const char *nl = strchr(p, '\n');
        char line[512];
        size_t n = (size_t)(nl - p);
        cr_assert_lt(n, sizeof line);
        memcpy(line, p, n);
        line[n] = 0;
        p = nl + 1;
        if (!strncmp(line, "# HELP ", 7))
            continue;
        if (!strncmp(line, "# TYPE ", 7)) {
            cr_assert_eq(sscanf(line + 7, "%127s %31s", family, type), 2);
            last_bucket = -1;
            continue;
        }
        cr_assert_neq(family[0], 0, "sample before any TYPE: %s", line);
        cr_assert(!strncmp(line, family, strlen(family)), "sample '%s' outside its family %s", line, family);
        const char *sp = strrchr(line, ' ');
        cr_assert_not_null(sp);
        char *end;
        double v = strtod(sp + 1, &end);
        cr_assert(*end == 0 && isfinite(v), "bad value in '%s'", line);
        if (!strcmp(type, "histogram") && strstr(line, "_bucket{")) {
            cr_assert_geq(v, last_bucket, "buckets not cumulative: %s", line);
            last_bucket = v;
        }
        if (!strcmp(type, "histogram") && strstr(line, "_count "))
            cr_assert_eq(v, last_bucket, "_count differs from the +Inf bucket: %s", line);
        if (!strcmp(type, "counter"))
            cr_assert(strstr(family, "_total"), "counter %s without _total", family);
    }
}

Test(metrics, exposition_format_and_promtool) {
    eng_metrics *m = make("single-gpu");
    eng_metrics_begin(m);
    for (int h = 0; h < ENG_HIST_COUNT; h++)
        for (int i = 0; i < 50; i++)
            eng_metrics_observe(m, (eng_hist)h, 0.0005 * i * i);
    eng_metrics_add_tokens(m, 1000, 300, eng_metrics_now());
    eng_metrics_add_request(m, ENG_FINISH_ERROR);
    eng_metrics_end(m);
    char *t = eng_metrics_render(m);
    check_structure(t);

    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        free(t);
        eng_metrics_destroy(m);
        cr_skip_test("promtool not installed (apt-get install prometheus)");
    }
    char path[] = "/tmp/kvserve-metrics-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    FILE *f = fdopen(fd, "w");
    fputs(t, f);
    fclose(f);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s 2>&1", path);
    FILE *pp = popen(cmd, "r");
    char out[4096] = "";
    size_t got = fread(out, 1, sizeof out - 1, pp);
    out[got] = 0;
    int rc = pclose(pp);
    unlink(path);
    cr_assert_eq(rc, 0, "promtool check metrics failed:\n%s", out);
    free(t);
    eng_metrics_destroy(m);
}
