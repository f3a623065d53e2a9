"""Run the app under uvicorn: load in the background (/health answers at once), stop gracefully.

SIGTERM (what Kubernetes, systemd and `docker stop` send) drains: /ready turns 503, new edits
get 503, uvicorn stops accepting connections and waits for in-flight responses, the workers
finish what is queued, and the process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import logging
import signal
import threading

from ..errors import require
from .options import ServeOptions

log = logging.getLogger("varedit_deploy.serve")


def make_server(options: ServeOptions, log_level: str = "info"):
    """A uvicorn server for `options` whose state loads when `serve` starts it."""
    uvicorn = require("uvicorn", "serve")
    require("starlette", "serve")
    require("python_multipart", "serve", package="python-multipart")
    require("prometheus_client", "serve", package="prometheus-client")
    from .app import create_app
    from .state import ServerState

    state = ServerState(options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.drain()
            if sig == signal.SIGTERM:  # a graceful stop is a normal exit, not death by signal
                self.should_exit = True
            else:
                super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(state), host=options.host, port=options.port, log_level=log_level,
                            access_log=False, lifespan="off", timeout_keep_alive=5)
    server = Server(config)
    server.state = state
    return server


def serve(options: ServeOptions, log_level: str = "info") -> int:
    """Serve until SIGTERM/SIGINT; 0 after a graceful stop; raises what stopped the model from loading."""
    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    server = make_server(options, log_level)
    failure = run(server)
    if failure is not None:
        raise failure
    return 0


def run(server) -> Exception | None:
    """Run `server` in this thread, loading its pipelines alongside; returns the load failure, if any."""
    state = server.state
    failure: list[Exception] = []

    def load() -> None:
        try:
            state.load()
            log.info("ready: %s on http://%s:%d", state.model_id, server.config.host, server.config.port)
        except Exception as e:  # noqa: BLE001 - handed to the main thread, which raises it
            failure.append(e)
            server.should_exit = True

    loader = threading.Thread(target=load, name="varedit-loader", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        state.drain()
        loader.join()
        state.close(cancel=server.force_exit)  # workers finish what is queued, unless the exit is forced
    return failure[0] if failure else None
