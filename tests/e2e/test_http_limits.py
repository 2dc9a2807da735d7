"""The daemon's guards against the real binary: /health while the model
loads (and a model that fails to load), the API key (401), the waiting
queue bound (503 + Retry-After), connection, idle and request-time limits."""
import json
import os
import socket
import tempfile
import threading
import time
import unittest

import openai

from daemon import Daemon, metric, raw_exchange, sse_events


def error_of(body):
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


class Loading(unittest.TestCase):
    def test_health_says_loading_until_ready_and_load_failure_exits_1(self):
        # A FIFO as the model: opening it blocks the loader until a writer
        # comes, so the daemon is deterministically "loading" meanwhile.
        tmp = tempfile.mkdtemp()
        fifo = os.path.join(tmp, "model.gguf")
        os.mkfifo(fifo)
        d = Daemon(model=fifo).start(wait=False)
        try:
            deadline = time.time() + 30
            status = None
            while time.time() < deadline:
                try:
                    status, hdrs, body = d.request("GET", "/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.05)
            self.assertEqual(status, 503)
            self.assertEqual(json.loads(body), {"status": "loading"})
            self.assertIn("retry-after", hdrs)
            status, hdrs, body = d.request("POST", "/v1/completions", {"prompt": "x"})
            self.assertEqual(status, 503)
            self.assertEqual(error_of(body)["code"], "model_loading")
            self.assertIn("retry-after", hdrs)
            status, _, _ = d.request("GET", "/metrics")
            self.assertEqual(status, 200, "metrics answer while loading")
            try:
                with open(fifo, "wb") as w:
                    w.write(b"not a model")
            except BrokenPipeError:
                pass  # the loader gave up on what it read first
            d.proc.wait(60)
            self.assertEqual(d.proc.returncode, 1)
            self.assertIn("cannot start the engine", d.output())
        finally:
            d.close()
            os.unlink(fifo)
            os.rmdir(tmp)


class AuthAndOverload(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon("--api-key", "sekrit", "--max-waiting", "1", "--max-seqs", "1").start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.close()

    def test_health_and_metrics_need_no_key(self):
        self.assertEqual(self.d.request("GET", "/health")[0], 200)
        self.assertEqual(self.d.request("GET", "/metrics")[0], 200)

    def test_401(self):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"},
                        {"Authorization": "Bearer sekrit2"}):
            status, hdrs, body = self.d.request("GET", "/v1/models", headers=headers)
            self.assertEqual(status, 401, headers)
            self.assertEqual(error_of(body)["code"], "invalid_api_key")
            self.assertEqual(hdrs["www-authenticate"], "Bearer")
        status, _, _ = self.d.request("POST", "/tokenize", {"prompt": "x"})
        self.assertEqual(status, 401)
        status, _, _ = self.d.request("GET", "/v1/models", headers={"Authorization": "Bearer sekrit"})
        self.assertEqual(status, 200)
        with self.assertRaises(openai.AuthenticationError):
            openai.OpenAI(base_url=self.d.base_url, api_key="nope", max_retries=0).models.list()

    def test_503_when_queue_full(self):
        # max_seqs 1, max_waiting 1: one request runs, one waits, the third is refused
        key = {"Authorization": "Bearer sekrit"}
        running = self.d.conn()
        running.request("POST", "/v1/completions", json.dumps(
            {"prompt": "x", "max_tokens": 500, "ignore_eos": True, "stream": True}), headers=key)
        r = running.getresponse()
        r.read1(100)  # it runs
        waiting_result = []
        t = threading.Thread(target=lambda: waiting_result.append(
            self.d.request("POST", "/v1/completions", {"prompt": "y", "max_tokens": 1}, headers=key)))
        t.start()
        deadline = time.time() + 10
        while time.time() < deadline and metric(self.d.metrics(), "kvserve_num_requests_waiting") < 1:
            time.sleep(0.05)
        status, hdrs, body = self.d.request("POST", "/v1/completions", {"prompt": "z", "max_tokens": 1}, headers=key)
        running.close()  # hang up: cancels the long request, the waiting one runs
        t.join(60)
        self.assertEqual(status, 503, body)
        self.assertEqual(hdrs["retry-after"], "1")
        err = error_of(body)
        self.assertEqual((err["type"], err["code"]), ("server_error", "overloaded"))
        self.assertIn("max_waiting 1", err["message"])
        self.assertEqual(waiting_result[0][0], 200)


class Limits(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon("--idle-timeout", "1", "--request-timeout", "1").start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.close()

    def test_idle_connection_closed(self):
        s = socket.create_connection(("127.0.0.1", self.d.port), timeout=5)
        t0 = time.time()
        self.assertEqual(s.recv(100), b"", "the server closes an idle connection")
        self.assertLess(time.time() - t0, 3)
        s.close()

    def test_slow_request_408(self):
        out = raw_exchange(self.d.port, b"GET /health HTTP/1.1\r\nHost: x\r\n", timeout=5)
        self.assertTrue(out.startswith(b"HTTP/1.1 408 "), out)

    def test_request_timeout(self):
        # 4 x 480 tokens: far more than any CPU makes in the 1 s allowed
        body = {"prompt": "Once upon a time", "max_tokens": 480, "n": 4, "ignore_eos": True}
        t0 = time.time()
        status, _, data = self.d.request("POST", "/v1/completions", body)
        self.assertEqual(status, 504)
        self.assertEqual(error_of(data)["code"], "timeout")
        self.assertLess(time.time() - t0, 5)
        c = self.d.conn()
        c.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)))
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        events = sse_events(r)
        c.close()
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(events[-2]["error"]["code"], "timeout")
        # the engine requests were cancelled: nothing left running
        deadline = time.time() + 5
        while time.time() < deadline and metric(self.d.metrics(), "kvserve_num_requests_running") > 0:
            time.sleep(0.1)
        self.assertEqual(metric(self.d.metrics(), "kvserve_num_requests_running"), 0)


class ConnectionLimit(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon("--max-connections", "4").start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.close()

    def test_connection_limit_503(self):
        # hold 4 connections, each known to be accepted (it answered a
        # request); connections of earlier requests may take a moment to be
        # seen closed, so a held one refused meanwhile is retried
        held = []
        for _ in range(50):
            if len(held) == 4:
                break
            s = socket.create_connection(("127.0.0.1", self.d.port), timeout=5)
            s.sendall(b"GET /health HTTP/1.1\r\n\r\n")
            if s.recv(4096).startswith(b"HTTP/1.1 200 "):
                held.append(s)
            else:
                s.close()
                time.sleep(0.1)
        try:
            self.assertEqual(len(held), 4)
            out = raw_exchange(self.d.port, b"GET /health HTTP/1.1\r\n\r\n", timeout=5)
            self.assertTrue(out.startswith(b"HTTP/1.1 503 "), out)
            self.assertIn(b"max_connections 4", out)
            self.assertIn(b"Retry-After: 1", out)
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        self.assertEqual(self.d.request("GET", "/health")[0], 200)
        self.assertGreaterEqual(metric(self.d.metrics(), "kvserve_http_connections_rejected_total"), 1)
