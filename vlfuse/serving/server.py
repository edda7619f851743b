"""Run an app under uvicorn with a graceful shutdown: on SIGTERM/SIGINT stop accepting connections, let the
requests in flight finish (up to ``grace_s``), then exit with status 0."""
from __future__ import annotations

import contextlib

import uvicorn


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises a caught SIGTERM after its graceful shutdown, so the process would die *by* the signal
    (exit status -15) even though nothing went wrong; a clean shutdown exits normally here."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # shut down cleanly: nothing left to re-raise


def run_server(app, host: str, port: int, grace_s: float, log_level: str = "info") -> bool:
    """Serve until a signal arrives; True if the server started (False: e.g. the port was taken)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=int(grace_s))
    server = GracefulServer(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
        return False
    return bool(server.started)
