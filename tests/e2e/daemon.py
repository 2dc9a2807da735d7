"""Starting and stopping `kvserve serve` on a free loopback port for the HTTP
end-to-end tests, and small HTTP helpers (http.client, raw sockets, SSE)."""
import http.client
import json
import os
import signal
import socket
import subprocess
import tempfile
import time

from kv import BIN, MODEL


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Daemon:
    """One kvserve serve process. Small, fast settings unless overridden:
    a short context, a small KV arena, two compute threads."""

    BASE = ["--n-ctx", "512", "--kv-memory", "64M", "--threads", "2", "--max-seqs", "64"]

    def __init__(self, *args, base=True, model=MODEL, env=None):
        self.port = free_port()
        self.args = [BIN, "serve", "--model", model, "--port", str(self.port)] + (self.BASE if base else []) + list(args)
        self.env = dict(os.environ, **env) if env else None
        self.log = tempfile.NamedTemporaryFile(prefix="kvserve-serve-", suffix=".log", delete=False)
        self.proc = None

    def start(self, wait=True, timeout=120):
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("kvserve serve exited %d:\n%s" % (self.proc.returncode, self.output()[-3000:]))
            try:
                status, _, _ = self.request("GET", "/health", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("kvserve serve not ready after %d s:\n%s" % (timeout, self.output()[-3000:]))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Sends sig and waits; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("kvserve serve did not exit %d s after signal %d" % (timeout, sig))
        return self.proc.returncode

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)

    def output(self):
        with open(self.log.name, errors="replace") as f:
            return f.read()

    @property
    def base_url(self):
        return "http://127.0.0.1:%d/v1" % self.port

    def conn(self, timeout=120):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=120):
        """One request on a fresh connection; returns (status, headers dict
        with lower-case names, body bytes)."""
        c = self.conn(timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            c.close()

    def json(self, method, path, body=None, headers=None, timeout=120):
        status, hdrs, data = self.request(method, path, body, headers, timeout)
        return status, hdrs, json.loads(data)

    def metrics(self):
        status, _, data = self.request("GET", "/metrics")
        assert status == 200, status
        return data.decode()


def metric(text, name, labels=None):
    """The value of a sample in Prometheus text (labels: exact label text)."""
    want = name + ("{%s}" % labels if labels else "")
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == want:
            return float(value)
    raise KeyError(want)


def sse_events(resp):
    """Reads an SSE response (http.client) to its end: the list of data
    payloads (parsed JSON, or the string "[DONE]")."""
    events = []
    buf = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    payload = line[6:].decode()
                    events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def raw_exchange(port, data, timeout=10, read_until_close=True):
    """Sends raw bytes on a new socket; returns what comes back until the
    server closes (or the timeout)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
            if not read_until_close:
                break
        return out
    finally:
        s.close()
