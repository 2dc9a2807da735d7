"""The daemon's OpenAI-compatible API against the real binary and the
default model: the official openai SDK (completion, chat, streaming, n=2,
stop, seeds), every endpoint over plain HTTP, the error shapes, the access
log, and /metrics (promtool check metrics, counters that move).

References: transformers' token ids and greedy answer for the SmolLM2 chat
prompt (tests/fixtures/smollm2/reference.json), OpenAI's reply shapes."""
import json
import re
import shutil
import subprocess
import time
import unittest

import openai

from daemon import Daemon, metric, sse_events
from kv import smollm2_reference

REF = smollm2_reference()
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


class SDK(unittest.TestCase):
    """The official openai Python client, pointed at kvserve."""

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon().start()
        cls.client = openai.OpenAI(base_url=cls.d.base_url, api_key="unused", max_retries=0, timeout=120)
        cls.model = cls.client.models.list().data[0].id

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.close()

    def test_models(self):
        models = self.client.models.list().data
        self.assertEqual(len(models), 1)
        self.assertEqual(models[0].id, "SmolLM2-135M-Instruct.Q4_1")
        self.assertEqual(self.client.models.retrieve(self.model).id, self.model)

    def test_completion(self):
        r = self.client.completions.create(model=self.model, prompt="The capital of France is", max_tokens=6,
                                           temperature=0, extra_body={"ignore_eos": True})
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(len(r.choices), 1)
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertTrue(r.choices[0].text)
        self.assertEqual(r.usage.completion_tokens, 6)
        self.assertEqual(r.usage.prompt_tokens, 5)  # "The capital of France is": 5 tokens, no BOS for SmolLM2
        self.assertEqual(r.usage.total_tokens, 11)

    def test_chat_greedy_answer(self):
        r = self.client.chat.completions.create(model=self.model, messages=QUESTION, max_tokens=20, temperature=0)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertEqual(r.usage.prompt_tokens, len(REF["chat_prompt_ids"]))
        # transformers' greedy answer, without the end token (which stops it)
        self.assertEqual(r.choices[0].message.content, REF["chat_greedy_text"].replace("<|im_end|>", ""))
        self.assertEqual(r.choices[0].finish_reason, "stop")

    def test_streaming_equals_whole(self):
        kw = dict(model=self.model, messages=QUESTION, max_tokens=8, temperature=0)
        whole = self.client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(self.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, whole)
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(len(finals), 1)
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.prompt_tokens, len(REF["chat_prompt_ids"]))
        self.assertLessEqual(chunks[-1].usage.completion_tokens, 8)

    def test_completion_stream(self):
        stream = self.client.completions.create(model=self.model, prompt="Once upon a time", max_tokens=5,
                                                temperature=0, stream=True, extra_body={"ignore_eos": True})
        chunks = list(stream)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "length")
        whole = self.client.completions.create(model=self.model, prompt="Once upon a time", max_tokens=5,
                                               temperature=0, extra_body={"ignore_eos": True})
        self.assertEqual("".join(c.choices[0].text for c in chunks), whole.choices[0].text)

    def test_n_2(self):
        r = self.client.completions.create(model=self.model, prompt="The capital of France is", max_tokens=4, n=2,
                                           temperature=1.0, seed=3, extra_body={"ignore_eos": True})
        self.assertEqual(sorted(c.index for c in r.choices), [0, 1])
        self.assertEqual(r.usage.completion_tokens, 8)
        self.assertEqual(r.usage.prompt_tokens, 5, "the prompt counts once for both choices")
        chat = self.client.chat.completions.create(model=self.model, messages=QUESTION, max_tokens=3, n=2,
                                                   temperature=0.8, seed=1)
        self.assertEqual(len(chat.choices), 2)

    def test_stop(self):
        kw = dict(model=self.model, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0,
                  extra_body={"ignore_eos": True})
        free = self.client.completions.create(**kw).choices[0].text
        words = [w for w in re.split(r"[ ,]+", free) if w]
        self.assertGreaterEqual(len(words), 2, free)
        stop = words[1]
        r = self.client.completions.create(stop=[stop, "@@never@@"], **kw)
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(r.choices[0].text, free[:free.index(stop)])
        self.assertNotIn(stop, r.choices[0].text)

    def test_same_seed_same_text(self):
        kw = dict(model=self.model, prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.95,
                  extra_body={"ignore_eos": True})
        a = self.client.completions.create(seed=7, **kw).choices[0].text
        b = self.client.completions.create(seed=7, **kw).choices[0].text
        c = self.client.completions.create(seed=8, **kw).choices[0].text
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_priority_field(self):
        # vLLM's field through the real SDK: any integer is served, and greedy
        # output does not depend on it (Endpoints checks the 400s)
        kw = dict(model=self.model, prompt="The capital of France is", max_tokens=6, temperature=0)
        plain = self.client.completions.create(**kw).choices[0].text
        for p in (-3, 0, 7):
            r = self.client.completions.create(extra_body={"priority": p}, **kw)
            self.assertEqual(r.choices[0].text, plain)

    def test_logprobs(self):
        r = self.client.chat.completions.create(model=self.model, messages=QUESTION, max_tokens=4, temperature=0,
                                                logprobs=True)
        content = r.choices[0].logprobs.content
        self.assertEqual(len(content), r.usage.completion_tokens)
        self.assertEqual("".join(t.token for t in content), r.choices[0].message.content)
        for t in content:
            self.assertLessEqual(t.logprob, 0.0)
        # a choice ended by its end token: that token counts but has no text and no entry;
        # the third token of the greedy answer made a stop token
        _, _, tok = self.d.json("POST", "/tokenize", {"prompt": r.choices[0].message.content,
                                                      "add_special_tokens": False})
        stop_id = tok["tokens"][2]
        r = self.client.chat.completions.create(model=self.model, messages=QUESTION, max_tokens=8, temperature=0,
                                                logprobs=True, extra_body={"stop_token_ids": [stop_id]})
        content = r.choices[0].logprobs.content
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(len(content), r.usage.completion_tokens - 1)
        self.assertEqual("".join(t.token for t in content), r.choices[0].message.content)

    def test_sdk_errors(self):
        with self.assertRaises(openai.NotFoundError) as cm:
            self.client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        self.assertEqual(cm.exception.code, "model_not_found")
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.completions.create(model=self.model, prompt="x", max_tokens=1, temperature=5)
        self.assertEqual(cm.exception.param, "temperature")


class Records(unittest.TestCase):
    """The engine's record and draw paths (what the cuda backend returns
    instead of whole logit rows) behind the HTTP API, on the CPU backend,
    which returns them with KVSERVE_CPU_CANDS=1: each request, one at a
    time (the same batches, so the same logits), gives the same text and
    logprobs as with whole rows."""

    REQS = [
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16, "temperature": 0, "logprobs": True}),
        ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_k": 40,
                             "top_p": 0.9, "seed": 3}),
        ("/v1/completions", {"prompt": "The sea is", "max_tokens": 16, "temperature": 1.0, "seed": 5, "n": 2}),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16, "temperature": 0.8, "top_p": 0.95,
                                  "min_p": 0.02, "seed": 7, "logprobs": True}),
        ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 16, "temperature": 0.7, "seed": 9,
                                  "presence_penalty": 0.6, "frequency_penalty": 0.4}),
    ]

    def run_all(self, env):
        d = Daemon(env=env).start()
        try:
            out = []
            for path, body in self.REQS:
                status, _, r = d.json("POST", path, body)
                self.assertEqual(status, 200, r)
                out.append(r)
            return out, d.output()
        finally:
            d.stop()
            d.close()

    def test_records_and_draws_answer_as_whole_rows(self):
        rows, _ = self.run_all(None)
        recs, log = self.run_all({"KVSERVE_CPU_CANDS": "1"})
        self.assertIn("records and draws", log)  # the path under test was taken
        for i, (a, b) in enumerate(zip(rows, recs)):
            self.assertEqual(len(a["choices"]), len(b["choices"]), i)
            for ca, cb in zip(a["choices"], b["choices"]):
                ta = ca["text"] if "text" in ca else ca["message"]["content"]
                tb = cb["text"] if "text" in cb else cb["message"]["content"]
                self.assertEqual(ta, tb, "request %d" % i)
                self.assertTrue(ta, "request %d: an empty answer" % i)
                la, lb = ca.get("logprobs"), cb.get("logprobs")
                if la and "content" in la:
                    for x, y in zip(la["content"], lb["content"]):
                        self.assertAlmostEqual(x["logprob"], y["logprob"], delta=1e-4)


class Endpoints(unittest.TestCase):
    """Every endpoint and error path over plain HTTP: status and JSON shape."""

    @classmethod
    def setUpClass(cls):
        cls.d = Daemon("--max-body-bytes", "64K", "--max-header-bytes", "4K").start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.close()

    def assertError(self, status, hdrs, body, want_status, param=None, words=None, code=None):
        self.assertEqual(status, want_status, body)
        self.assertTrue(hdrs["content-type"].startswith("application/json"))
        err = json.loads(body)["error"]
        self.assertEqual(set(err), {"message", "type", "param", "code"})
        self.assertEqual(err["type"], "invalid_request_error" if want_status < 500 else "server_error")
        self.assertEqual(err["param"], param)
        if code is not None:
            self.assertEqual(err["code"], code)
        if words:
            self.assertIn(words, err["message"])
        return err

    def test_health(self):
        status, hdrs, body = self.d.json("GET", "/health")
        self.assertEqual((status, body), (200, {"status": "ok"}))
        self.assertRegex(hdrs["x-request-id"], r"^[0-9a-f]{16}$")

    def test_models(self):
        status, _, body = self.d.json("GET", "/v1/models")
        self.assertEqual(status, 200)
        self.assertEqual(body["object"], "list")
        m = body["data"][0]
        self.assertEqual((m["object"], m["max_model_len"]), ("model", 512))
        status, _, one = self.d.json("GET", "/v1/models/" + m["id"])
        self.assertEqual((status, one["id"]), (200, m["id"]))
        self.assertError(*self.d.request("GET", "/v1/models/gpt-4"), 404, "model", code="model_not_found")

    def test_tokenize_matches_transformers(self):
        status, _, body = self.d.json("POST", "/tokenize", {"messages": QUESTION})
        self.assertEqual(status, 200)
        self.assertEqual(body["tokens"], REF["chat_prompt_ids"])
        self.assertEqual(body["count"], len(REF["chat_prompt_ids"]))
        self.assertEqual(body["max_model_len"], 512)
        status, _, body = self.d.json("POST", "/tokenize", {"prompt": REF["chat_prompt"]})
        self.assertEqual(body["tokens"], REF["chat_prompt_ids"], "special tokens in text are recognized")

    def test_detokenize_round_trip(self):
        status, _, body = self.d.json("POST", "/detokenize", {"tokens": REF["chat_greedy_ids"][:-1]})
        self.assertEqual(status, 200)
        self.assertEqual(body["prompt"], "The capital of France is Paris.")
        status, _, body = self.d.json("POST", "/tokenize", {"prompt": "héllo wörld ✓", "add_special_tokens": False})
        status, _, back = self.d.json("POST", "/detokenize", {"tokens": body["tokens"]})
        self.assertEqual(back["prompt"], "héllo wörld ✓")

    def test_raw_sse(self):
        c = self.d.conn()
        c.request("POST", "/v1/completions", json.dumps(
            {"prompt": "Hello", "max_tokens": 3, "stream": True, "ignore_eos": True, "temperature": 0}))
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Content-Type"), "text/event-stream")
        self.assertEqual(r.getheader("Transfer-Encoding"), "chunked")
        events = sse_events(r)
        c.close()
        self.assertEqual(events[-1], "[DONE]")
        data = events[:-1]
        self.assertEqual(len(data), 3)
        self.assertEqual(data[-1]["choices"][0]["finish_reason"], "length")
        self.assertNotIn("usage", data[0], "usage only with stream_options.include_usage")

    def test_bad_json(self):
        self.assertError(*self.d.request("POST", "/v1/completions", '{"prompt": "x",'), 400, None,
                         "could not parse the JSON")
        self.assertError(*self.d.request("POST", "/v1/chat/completions", "[]"), 400, None, "JSON object")

    def test_wrong_type_and_range(self):
        self.assertError(*self.d.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": "ten"}), 400,
                         "max_tokens", "must be an integer")
        self.assertError(*self.d.request("POST", "/v1/chat/completions", {"messages": QUESTION, "top_p": 1.5}), 400,
                         "top_p", "(0, 1]")
        self.assertError(*self.d.request("POST", "/v1/chat/completions",
                                         {"messages": [{"role": "robot", "content": "x"}]}), 400, "messages[0].role")
        self.assertError(*self.d.request("POST", "/v1/completions", {"prompt": [1, 99999999]}), 400, "prompt",
                         "out of range")
        self.assertError(*self.d.request("POST", "/detokenize", {"tokens": "1 2"}), 400, "tokens")
        for bad in ("high", 1.5, 2 ** 31):
            self.assertError(*self.d.request("POST", "/v1/completions", {"prompt": "x", "priority": bad}), 400,
                             "priority")

    def test_prompt_too_long_names_both_lengths(self):
        status, hdrs, body = self.d.request("POST", "/v1/completions", {"prompt": "hello " * 600, "max_tokens": 4})
        err = self.assertError(status, hdrs, body, 400, "prompt", code="context_length_exceeded")
        self.assertIn("maximum context length is 512 tokens", err["message"])
        m = re.search(r"(\d+) in the prompt", err["message"])
        self.assertTrue(m and int(m.group(1)) > 512, err["message"])
        status, hdrs, body = self.d.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 600})
        err = self.assertError(status, hdrs, body, 400, "prompt", code="context_length_exceeded")
        self.assertIn("600 for the completion", err["message"])

    def test_unknown_path_and_method(self):
        self.assertError(*self.d.request("GET", "/v2/nothing"), 404, None, "/v2/nothing")
        status, hdrs, body = self.d.request("GET", "/v1/completions")
        self.assertError(status, hdrs, body, 405, None, code="method_not_allowed")
        self.assertEqual(hdrs["allow"], "POST")
        status, hdrs, _ = self.d.request("DELETE", "/health")
        self.assertEqual((status, hdrs["allow"]), (405, "GET"))

    def test_unknown_model(self):
        self.assertError(*self.d.request("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": QUESTION}),
                         404, "model", code="model_not_found")

    def test_body_too_large(self):
        status, hdrs, body = self.d.request("POST", "/v1/completions", "x" * (65 * 1024))
        self.assertError(status, hdrs, body, 413, None, "65536", code="request_too_large")

    def test_headers_too_large(self):
        status, hdrs, body = self.d.request("GET", "/health", headers={"X-Big": "y" * 5000})
        self.assertError(status, hdrs, body, 431, None, "4096")

    def test_unknown_fields_accepted_and_logged(self):
        status, _, body = self.d.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1, "frobnicate": 3})
        self.assertEqual(status, 200)
        self.assertIn("unknown fields: frobnicate", self.d.output())

    def test_request_id_and_access_log(self):
        status, hdrs, body = self.d.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True},
                                         headers={"X-Request-Id": "test-req-42"})
        self.assertEqual(status, 200)
        self.assertEqual(hdrs["x-request-id"], "test-req-42")
        time.sleep(0.2)
        line = [l for l in self.d.output().splitlines() if "request_id=test-req-42" in l]
        self.assertEqual(len(line), 1)
        self.assertRegex(line[0], r"access POST /v1/completions 200 prompt_tokens=1 completion_tokens=2 "
                                  r"ttft=[0-9.]+s total=[0-9.]+s request_id=test-req-42$")

    def test_keep_alive_chunked_and_pipelining(self):
        c = self.d.conn()
        for _ in range(3):  # one connection, three requests
            c.request("GET", "/health")
            r = c.getresponse()
            self.assertEqual(r.status, 200)
            r.read()
        # a chunked request body (Transfer-Encoding: chunked)
        parts = (p.encode() for p in ['{"prompt": ', '"Hello there"', ', "add_special_tokens": false}'])
        c.request("POST", "/tokenize", body=parts, encode_chunked=True,
                  headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        self.assertEqual(json.loads(r.read())["count"], 2)
        c.close()
        from daemon import raw_exchange
        out = raw_exchange(self.d.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                                        b"POST /tokenize HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"prompt\": \"Hi\"}"
                                        b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
        statuses = re.findall(rb"HTTP/1.1 (\d+)", out)
        self.assertEqual(statuses, [b"200", b"200", b"404"], out)

    def test_malformed_http(self):
        from daemon import raw_exchange
        out = raw_exchange(self.d.port, b"NONSENSE\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertIn(b"malformed HTTP request", out)

    def test_metrics(self):
        before = self.d.metrics()
        _, _, body = self.d.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        self.assertEqual(body["usage"]["completion_tokens"], 3)
        after = self.d.metrics()
        self.assertEqual(metric(after, "kvserve_generation_tokens_total") - metric(before, "kvserve_generation_tokens_total"), 3)
        self.assertEqual(metric(after, "kvserve_prompt_tokens_total") - metric(before, "kvserve_prompt_tokens_total"), 1)
        self.assertGreaterEqual(metric(after, "kvserve_http_requests_total") - metric(before, "kvserve_http_requests_total"), 2)
        self.assertEqual(metric(after, "kvserve_server_ready"), 1)
        self.assertIn("kvserve_kv_pages_used", after)
        promtool = shutil.which("promtool")
        if not promtool:
            self.skipTest("promtool not installed (Debian package prometheus)")
        p = subprocess.run([promtool, "check", "metrics"], input=after, capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
