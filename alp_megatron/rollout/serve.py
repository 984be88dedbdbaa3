"""Run one SGLang server in the foreground (for launch scripts): the same launcher the trainer uses, so the
CPU import stand-ins and flags apply when there is no GPU. Stops the server on SIGTERM/SIGINT.

    python -m alp_megatron.rollout.serve --model-path DIR --port 30000 [--host 0.0.0.0 --api-key KEY]
        [--tp-size N] [--dtype bfloat16] [--weight-version v0] [-- extra sglang.launch_server args]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from alp_megatron.errors import AlpError
from alp_megatron.rollout.process import stop_unrecorded_launches
from alp_megatron.rollout.server import ServerConfig, SGLangServer


class _StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT arrived before the server was healthy."""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--weight-version", default="v0")
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop, starting = threading.Event(), threading.Event()
    signals = {signal.SIGTERM, signal.SIGINT}

    def on_signal(*_):
        stop.set()
        if starting.is_set():
            starting.clear()  # raise once; a second signal only sets `stop`
            raise _StoppedWhileStarting  # out of the health wait: a job ending early need not wait for it

    for signum in signals:
        signal.signal(signum, on_signal)
    server = None
    starting.set()
    try:
        server = SGLangServer(ServerConfig(
            model_path=args.model_path, port=args.port, host=args.host, api_key=args.api_key,
            tp_size=args.tp_size, dtype=args.dtype, weight_version=args.weight_version, extra_args=tuple(extra),
            log_dir=args.log_dir, startup_timeout_s=args.startup_timeout))
        server.start()
        server.wait_healthy()
        starting.clear()
    except AlpError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 1
    except _StoppedWhileStarting:
        print("serve: stopped while the server was starting", file=sys.stderr)
        if server is not None:
            server.stop()
        # A signal between a launch's fork and its record leaves a launcher nothing knows of. (Holding the
        # signals back around the launch instead would start the server with them blocked: a child inherits
        # its parent's signal mask.)
        stop_unrecorded_launches()
        return 0
    print(f"SGLang server ready at {server.url} (log {server.log_path})", flush=True)
    try:
        while not stop.wait(2.0):
            if not server.is_alive():
                print(f"serve: the SGLang server died; log tail:\n{server.log_tail(40)}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
