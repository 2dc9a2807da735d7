"""The daemon under load and at shutdown, against the real binary: 200
concurrent streaming clients of which 20% hang up mid-stream (the others all
complete, the KV pool is fully free afterwards), and SIGTERM during 10
in-flight streams (all finish, exit status 0)."""
import http.client
import json
import signal
import socket
import threading
import time
import unittest

from daemon import Daemon, metric, sse_events


def stream(port, body, results, i, hang_up=False):
    """One streaming client; results[i] = the SSE events, or "hung up"."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        c.request("POST", "/v1/completions", json.dumps(body))
        r = c.getresponse()
        if r.status != 200:
            results[i] = ("status", r.status, r.read())
            return
        if hang_up:
            r.read1(100)  # the first chunk: the request is running
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
            results[i] = "hung up"
            return
        results[i] = sse_events(r)
        c.close()
    except Exception as e:  # reported by the test
        results[i] = ("exception", repr(e))


def wait_pool_free(d, timeout):
    deadline = time.time() + timeout
    while True:
        m = d.metrics()
        busy = (metric(m, "kvserve_num_requests_running"), metric(m, "kvserve_num_requests_waiting"),
                metric(m, "kvserve_kv_pages_used"))
        if busy == (0, 0, 0) or time.time() > deadline:
            return busy
        time.sleep(0.1)


class Concurrency(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.d = Daemon("--max-waiting", "1024", "--max-batched-tokens", "1024").start()

    @classmethod
    def tearDownClass(cls):
        cls.d.stop()
        cls.d.close()

    def test_200_streams_20_percent_hang_up(self):
        n, n_gen = 200, 6
        results = [None] * n
        threads = []
        for i in range(n):
            hang_up = i % 5 == 0
            # a client that hangs up asked for far more than anyone could
            # finish within the test: only cancellation frees its pages
            body = {"prompt": "Request %d says" % i, "max_tokens": 400 if hang_up else n_gen,
                    "ignore_eos": True, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
            t = threading.Thread(target=stream, args=(self.d.port, body, results, i, hang_up))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(280)
        hung = [r for r in results if r == "hung up"]
        done = [r for r in results if isinstance(r, list)]
        other = [r for r in results if r != "hung up" and not isinstance(r, list)]
        self.assertEqual(other, [])
        self.assertEqual(len(hung), 40)
        self.assertEqual(len(done), 160)
        for events in done:
            self.assertEqual(events[-1], "[DONE]")
            usage = events[-2]
            self.assertEqual(usage["choices"], [])
            self.assertEqual(usage["usage"]["completion_tokens"], n_gen)
            finals = [e["choices"][0]["finish_reason"] for e in events[:-2] if e["choices"][0]["finish_reason"]]
            self.assertEqual(finals, ["length"])
        self.assertEqual(wait_pool_free(self.d, 10), (0, 0, 0), "running, waiting, pages used")
        log = self.d.output()
        self.assertEqual(log.count("access POST /v1/completions 499 "), 40)
        self.assertEqual(log.count("access POST /v1/completions 200 "), 160)


class Drain(unittest.TestCase):
    def test_sigterm_during_10_streams(self):
        d = Daemon("--shutdown-grace", "120").start()
        try:
            n, n_gen = 10, 16
            results = [None] * n
            first = threading.Barrier(n + 1, timeout=120)

            def client(i):
                try:
                    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=300)
                    c.request("POST", "/v1/completions", json.dumps(
                        {"prompt": "Story %d:" % i, "max_tokens": n_gen, "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True}}))
                    r = c.getresponse()
                    head = r.read1(65536)
                    first.wait()
                    rest = r.read()
                    results[i] = (head + rest).decode()
                    c.close()
                except Exception as e:
                    results[i] = repr(e)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            first.wait()  # every stream has begun
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with self.assertRaises(OSError, msg="no new connections while draining"):
                socket.create_connection(("127.0.0.1", d.port), timeout=2).close()
            for t in threads:
                t.join(240)
            d.proc.wait(60)
            self.assertEqual(d.proc.returncode, 0, d.output()[-2000:])
            for text in results:
                self.assertIsInstance(text, str)
                self.assertTrue(text.rstrip().endswith("data: [DONE]"), text[-300:])
                self.assertEqual(text.count('"finish_reason":"length"'), 1, text[-300:])
                self.assertIn('"completion_tokens":%d' % n_gen, text)
            self.assertIn("SIGTERM: draining", d.output())
        finally:
            d.close()
