"""A real `mllm-deploy serve` process on a free loopback port, for the serve tests."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    stderr: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def request(
        self, method: str, path: str, body: bytes | str | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One raw HTTP request: (status, headers, body)."""
        url = urlsplit(self.url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        try:
            conn.request(method, path, body, headers or {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: object = None, **kw) -> tuple[int, dict]:
        payload = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
        status, _, raw = self.request(method, path, payload, **kw)
        return status, json.loads(raw)

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        """The value of one unlabelled sample of /metrics."""
        _, _, raw = self.request("GET", "/metrics", headers=headers)
        for line in raw.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def start_server(*args: str, env: dict[str, str] | None = None, ready_timeout: float = 180) -> Server:
    """Start `serve --port 0 ARGS`; wait for its URL on stderr and for /health to say ok."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mllm_deploy", "serve", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    found = threading.Event()

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if " at http://" in line:
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    found.wait(ready_timeout)
    url_line = next((line for line in lines if " at http://" in line), None)
    if url_line is None:
        proc.kill()
        raise AssertionError("serve did not start:\n" + "".join(lines))
    url = url_line.split(" at ", 1)[1].split("/v1", 1)[0]
    server = Server(proc, url, lines)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}:\n" + "".join(lines))
        status, _, _ = server.request("GET", "/health")
        if status == 200:
            return server
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve never became ready:\n" + "".join(lines))
