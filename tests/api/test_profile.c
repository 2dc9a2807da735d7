/* test_profile.c: tests for api/profile.c: the configuration table read
 * from flags (text) and profile files (JSON): defaults, binary size units,
 * bounds, and errors that name the field and where it came from; and the
 * shipped profiles (deploy/profiles) all load and carry the deployment matrix of
 * DESIGN.md §7. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "api/profile.h"

static api_config c;
static char err[1024];

static void setup(void) { api_config_init(&c); }
static void teardown(void) { api_config_free(&c); }

TestSuite(profile, .init = setup, .fini = teardown);

static int set(const char *name, const char *value) {
    const api_cfg_field *f = api_cfg_find(name);
    cr_assert_not_null(f, "no field %s", name);
    return api_config_set(&c, f, value, "--flag", err, sizeof err);
}

/* Writes text to a temporary file; returns its path (static). */
static const char *temp_profile(const char *text) {
    static char path[64];
    snprintf(path, sizeof path, "/tmp/kvserve-test-profile-%d.json", (int)getpid());
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
    return path;
}

Test(profile, defaults) {
    cr_assert_str_eq(c.backend, "cpu");
    cr_assert_str_eq(c.kv_k, "f16");
    cr_assert_eq(c.kv_memory, (size_t)256 << 20);
    cr_assert_eq(c.block_size, 16);
    cr_assert_eq(c.max_seqs, 64);
    cr_assert_eq(c.max_batched_tokens, 2048);
    cr_assert_eq(c.port, 8080);
    cr_assert_str_eq(c.host, "127.0.0.1");
    cr_assert_eq(c.max_header_bytes, (size_t)16 << 10);
    cr_assert_eq(c.max_body_bytes, (size_t)8 << 20);
    cr_assert_float_eq(c.watermark, 0.01, 1e-12);
    cr_assert_null(c.api_key);
    cr_assert_null(c.model);
    cr_assert_null(c.devices);
}

Test(profile, names_accept_dashes) {
    cr_assert_not_null(api_cfg_find("max-seqs"));
    cr_assert_eq(api_cfg_find("max-seqs"), api_cfg_find("max_seqs"));
    cr_assert_null(api_cfg_find("max_seq"));
}

Test(profile, sizes) {
    static const struct {
        const char *text;
        size_t bytes;
    } cases[] = {{"512M", (size_t)512 << 20}, {"1.5G", (size_t)3 << 29}, {"2048KiB", 2 << 20},
                 {"2097152", 2 << 20}, {"1g", (size_t)1 << 30}, {"3MB", (size_t)3 << 20}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cr_assert_eq(set("kv_memory", cases[i].text), 0, "%s: %s", cases[i].text, err);
        cr_assert_eq(c.kv_memory, cases[i].bytes, "%s", cases[i].text);
    }
    cr_assert_eq(set("kv_memory", "12Q"), -1);
    cr_assert(strstr(err, "--flag: field 'kv_memory'") && strstr(err, "\"12Q\""), "%s", err);
    cr_assert_eq(set("kv_memory", "512K"), -1, "below the 1M minimum");
    cr_assert_eq(set("kv_memory", "-1M"), -1);
}

Test(profile, bounds_and_types) {
    cr_assert_eq(set("max_seqs", "0"), -1);
    cr_assert(strstr(err, "field 'max_seqs': must be an integer in [1, 4096], found \"0\""), "%s", err);
    cr_assert_eq(set("max_seqs", "4096"), 0);
    cr_assert_eq(c.max_seqs, 4096);
    cr_assert_eq(set("max_seqs", "12x"), -1);
    cr_assert_eq(set("port", "65536"), -1);
    cr_assert_eq(set("watermark", "0.6"), -1);
    cr_assert_eq(set("watermark", "nan"), -1);
    cr_assert_eq(set("watermark", "0.05"), 0);
    cr_assert_float_eq(c.watermark, 0.05, 1e-12);
    cr_assert_eq(set("backend", "tpu"), -1);
    cr_assert(strstr(err, "one of cpu|cuda"), "%s", err);
    cr_assert_eq(set("backend", "cuda"), 0);
    cr_assert_eq(set("kv_k", ""), -1, "a required string cannot be emptied");
    cr_assert_eq(set("api_key", "sekrit"), 0);
    cr_assert_str_eq(c.api_key, "sekrit");
    cr_assert_eq(set("devices", "0,x"), -1);
    cr_assert_eq(set("devices", "0, 1"), 0);
    cr_assert_str_eq(c.devices, "0,1");
    cr_assert_eq(set("devices", "0,1,7"), 0);
    cr_assert_str_eq(c.devices, "0,1,7");
    cr_assert_eq(set("devices", "64"), -1);
}

Test(profile, json_file) {
    const char *p = temp_profile("{\"max_seqs\": 8, \"kv_memory\": \"1G\", \"kv_v\": \"int8\", \"devices\": [0, 2],"
                                 " \"watermark\": 0, \"calib\": null, \"description\": \"test\"}");
    cr_assert_eq(api_config_load_file(&c, p, err, sizeof err), 0, "%s", err);
    cr_assert_eq(c.max_seqs, 8);
    cr_assert_eq(c.kv_memory, (size_t)1 << 30);
    cr_assert_str_eq(c.kv_v, "int8");
    cr_assert_str_eq(c.devices, "0,2");
    cr_assert_float_eq(c.watermark, 0.0, 0);
    cr_assert_str_eq(c.description, "test");
    cr_assert_eq(c.block_size, 16, "fields not in the file keep their value");
    unlink(p);
}

Test(profile, json_errors_name_field_and_file) {
    static const struct {
        const char *text, *words;
    } cases[] = {
        {"{\"max_seqz\": 3}", "unknown field 'max_seqz'"},
        {"{\"max-seqs\": 3}", "unknown field 'max-seqs'"},
        {"{\"max_seqs\": \"many\"}", "field 'max_seqs': must be an integer in [1, 4096], found \"many\""},
        {"{\"max_seqs\": 2.5}", "field 'max_seqs'"},
        {"{\"max_seqs\": 0}", "field 'max_seqs': must be an integer in [1, 4096], found 0"},
        {"{\"kv_memory\": true}", "field 'kv_memory'"},
        {"{\"kv_memory\": \"lots\"}", "field 'kv_memory'"},
        {"{\"backend\": \"gpu\"}", "field 'backend': must be one of cpu|cuda, found \"gpu\""},
        {"{\"kv_k\": null}", "field 'kv_k'"},
        {"{\"devices\": \"0\"}", "field 'devices'"},
        {"{\"devices\": [0, \"1\"]}", "field 'devices'"},
        {"{\"max_seqs\": 3, \"max_seqs\": 4}", "duplicate"},
        {"[1]", "must be a JSON object"},
        {"{\"max_seqs\": ", "line 1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *p = temp_profile(cases[i].text);
        api_config_free(&c);
        api_config_init(&c);
        cr_assert_eq(api_config_load_file(&c, p, err, sizeof err), -1, "%s accepted", cases[i].text);
        cr_assert(strstr(err, p), "%s: message lacks the file: %s", cases[i].text, err);
        cr_assert(strstr(err, cases[i].words), "%s: '%s' lacks '%s'", cases[i].text, err, cases[i].words);
        unlink(p);
    }
}

Test(profile, format_and_default) {
    char buf[64];
    const api_cfg_field *f = api_cfg_find("kv_memory");
    api_config_format(&c, f, buf, sizeof buf);
    cr_assert_str_eq(buf, "256M");
    cr_assert(api_config_is_default(&c, f));
    set("kv_memory", "1536M");
    api_config_format(&c, f, buf, sizeof buf);
    cr_assert_str_eq(buf, "1536M");
    cr_assert(!api_config_is_default(&c, f));
    set("kv_memory", "2000000");
    api_config_format(&c, f, buf, sizeof buf);
    cr_assert_str_eq(buf, "2000000");
    api_config_format(&c, api_cfg_find("watermark"), buf, sizeof buf);
    cr_assert_str_eq(buf, "0.01");
}

Test(profile, every_field_has_a_valid_default) {
    int n;
    const api_cfg_field *fields = api_cfg_fields(&n);
    cr_assert_gt(n, 20);
    for (int i = 0; i < n; i++) {
        char buf[256];
        api_config_format(&c, &fields[i], buf, sizeof buf);
        cr_assert(api_config_is_default(&c, &fields[i]), "%s", fields[i].name);
        cr_assert_not_null(fields[i].help);
        cr_assert_not_null(fields[i].group);
    }
}

Test(profile, find) {
    char path[256];
    const char *dirs[] = {"/nonexistent", "deploy/profiles"};
    cr_assert_eq(api_profile_find("laptop", dirs, 2, path, sizeof path, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(path, "deploy/profiles/laptop.json");
    cr_assert_eq(api_profile_find("deploy/profiles/laptop.json", dirs, 0, path, sizeof path, err, sizeof err), 0);
    cr_assert_eq(api_profile_find("nope", dirs, 2, path, sizeof path, err, sizeof err), -1);
    cr_assert(strstr(err, "no profile named 'nope'") && strstr(err, "/nonexistent, deploy/profiles"), "%s", err);
    cr_assert_eq(api_profile_find("/tmp/none.json", dirs, 2, path, sizeof path, err, sizeof err), -1);
    cr_assert(strstr(err, "/tmp/none.json"), "%s", err);
}

/* The shipped profiles: each loads, and each carries its row of the matrix. */
Test(profile, shipped_profiles) {
    static const struct {
        const char *name, *backend, *kv_k, *kv_v;
    } rows[] = {
        {"laptop", "cpu", "int4", "int4"},
        {"single-gpu", "cuda", "int8", "int8"},
        {"multi-gpu", "cuda", "f16", "int4"},
        {"low-latency", "cuda", "int8", "int8"},
        {"long-context", "cuda", "int4:g64", "int4:g64"},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        char path[256];
        snprintf(path, sizeof path, "deploy/profiles/%s.json", rows[i].name);
        api_config_free(&c);
        api_config_init(&c);
        cr_assert_eq(api_config_load_file(&c, path, err, sizeof err), 0, "%s", err);
        cr_assert_str_eq(c.backend, rows[i].backend, "%s", rows[i].name);
        cr_assert_str_eq(c.kv_k, rows[i].kv_k, "%s", rows[i].name);
        cr_assert_str_eq(c.kv_v, rows[i].kv_v, "%s", rows[i].name);
        cr_assert_not_null(c.description, "%s", rows[i].name);
    }
    /* multi-gpu: large batches; low-latency: small chunks */
    api_config_free(&c);
    api_config_init(&c);
    api_config_load_file(&c, "deploy/profiles/multi-gpu.json", err, sizeof err);
    int multi_batch = c.max_batched_tokens, multi_seqs = c.max_seqs;
    api_config_free(&c);
    api_config_init(&c);
    api_config_load_file(&c, "deploy/profiles/low-latency.json", err, sizeof err);
    cr_assert_gt(multi_batch, 2048);
    cr_assert_gt(multi_seqs, 64);
    cr_assert_lt(c.prefill_chunk, 512);
}
