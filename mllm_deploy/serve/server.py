"""Run the app on uvicorn: listen at once, load the engine on a thread (/health says "loading" with
its progress meanwhile), and on SIGINT/SIGTERM stop accepting, answer the waiting requests 503,
let the running one finish within `shutdown_seconds` (then cancel it) and return normally.

    code = serve(deployment, loader, settings, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import contextlib
import math
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator

import uvicorn

from mllm_deploy.errors import ExitCode, user_error
from mllm_deploy.events import current_reporter
from mllm_deploy.interface.deployment import Deployment
from mllm_deploy.interface.session import LoadedModel
from mllm_deploy.serve.app import ServeSettings, ServeState, build_app

WORKER_STOP_SECONDS = 5.0
HARD_STOP_AFTER_CANCEL_SECONDS = 5  # uvicorn cancels what is still open this long after the cancel


class _Server(uvicorn.Server):
    """uvicorn's server, with SIGINT/SIGTERM ending it gracefully and *not* re-raised afterwards
    (uvicorn re-raises them, which would turn a clean stop into exit 130 or a kill by SIGTERM)."""

    def __init__(self, config: uvicorn.Config, state: ServeState, shutdown_seconds: float):
        super().__init__(config)
        self.state = state
        self.shutdown_seconds = shutdown_seconds
        self.signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame: object) -> None:
        self.signals.append(sig)
        if self.should_exit:  # a second signal: do not wait for the running request
            self.state.cancel_running()
            self.force_exit = True
            return
        self.should_exit = True
        self.state.begin_shutdown()  # the waiting requests are answered 503 now
        # the running one may finish within the bound; then it is cancelled between tokens, so its
        # stream still ends with a finish chunk and [DONE] before uvicorn's own (later) hard timeout
        timer = threading.Timer(self.shutdown_seconds, self.state.cancel_running)
        timer.daemon = True
        timer.start()


def serve(
    deployment: Deployment,
    loader: Callable[[Deployment], LoadedModel],
    settings: ServeSettings,
    *,
    host: str,
    port: int,
    shutdown_seconds: float,
    access_log: bool = False,
    on_listening: Callable[[str], None] | None = None,
    on_ready: Callable[[ServeState], None] | None = None,
) -> int:
    """Serve until a signal; returns 0 after a graceful stop. Raises the loader's UserError when
    the engine could not load, and a located UserError (exit 3) when `host:port` cannot be bound.
    `on_listening(url)` once the socket is bound (port 0: a free port, said in the URL)."""
    sock = listen(host, port)
    state = ServeState(deployment, settings)
    config = uvicorn.Config(
        build_app(state),
        host=host,
        port=port,
        log_level="info" if access_log else "warning",
        access_log=access_log,
        timeout_graceful_shutdown=math.ceil(shutdown_seconds) + HARD_STOP_AFTER_CANCEL_SECONDS,
        lifespan="on",
    )
    server = _Server(config, state, shutdown_seconds)
    state.on_load_failed = lambda: setattr(server, "should_exit", True)
    outer = current_reporter()

    def load() -> None:
        state.load(loader, outer)
        if state.ready_at is not None and on_ready is not None:
            on_ready(state)

    loading = threading.Thread(target=load, name="mllm-serve-load", daemon=True)
    loading.start()
    bound_host, bound_port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(f"http://{_url_host(bound_host)}:{bound_port}")
    server.run(sockets=[sock])  # returns after a signal (graceful), or when loading failed
    state.begin_shutdown()
    if state.worker is not None and not state.worker.stop(WORKER_STOP_SECONDS):
        print("serve: the engine did not stop in time; leaving anyway", file=sys.stderr)
    if state.model is not None:
        state.model.engine.close()
    if state.load_error is not None:
        raise state.load_error  # a UserError: its located message and exit code; else an internal error
    return ExitCode.OK


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host:port` (IPv4 or IPv6), or a UserError (exit 3) saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them
    except OSError as exc:
        raise user_error(f"cannot listen on {host}:{port}: {exc.strerror or exc}", key="--host/--port",
                         value=f"{host}:{port}", hint="choose another --port (0: any free one)",
                         exit_code=ExitCode.CANNOT_RUN) from None  # fmt: skip
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
