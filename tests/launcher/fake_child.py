"""A stand-in for a shard, the router or download-weights in supervisor tests.

    fake_child.py ROLE [--uds PREFIX | --port N] [--delay S] [--exit-after S] [--code N]
                  [--fail-load] [--ignore-term] [--grandchild] [--piddir DIR] [--json]

A shard listens on the unix socket {PREFIX}-{RANK}; a router on 127.0.0.1:N; download exits.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["shard", "router", "download"])
    parser.add_argument("--uds")
    parser.add_argument("--port", type=int)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--code", type=int)
    parser.add_argument("--fail-load", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild", action="store_true")
    parser.add_argument("--piddir")
    parser.add_argument("--json", action="store_true")
    opts, _ = parser.parse_known_args()  # like the real router, ignore what it does not know

    rank = os.environ.get("RANK", "0")
    name = f"{opts.role}-{rank}" if opts.role == "shard" else opts.role
    if opts.piddir:
        with open(os.path.join(opts.piddir, f"{name}.pid"), "w") as f:
            f.write(str(os.getpid()))
    if opts.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        def on_term(signum, frame):
            print(f"{name} got SIGTERM", flush=True)
            os._exit(0)
        signal.signal(signal.SIGTERM, on_term)
    if opts.grandchild:
        helper = subprocess.Popen(["sleep", "1000"])
        with open(os.path.join(opts.piddir, f"{name}.grandchild"), "w") as f:
            f.write(str(helper.pid))

    print(f"{name} starting RANK={rank} WORLD_SIZE={os.environ.get('WORLD_SIZE')} "
          f"MASTER_PORT={os.environ.get('MASTER_PORT')} argv={sys.argv[2:]}", flush=True)
    if os.environ.get("API_KEY"):
        print(f"{name} has an API_KEY of {len(os.environ['API_KEY'])} characters", flush=True)
    if opts.json:
        print(json.dumps({"level": "INFO", "target": "fake", "message": f"{name} json line"}), flush=True)
    print(f"{name} a warning on stderr", file=sys.stderr, flush=True)
    time.sleep(opts.delay)
    code = 1 if opts.code is None else opts.code
    if opts.role == "download" or opts.fail_load:
        if opts.fail_load or opts.code:
            for i in range(25):
                print(f"{name} traceback line {i}", file=sys.stderr)
            print(f"error: {name} could not load the model", file=sys.stderr, flush=True)
            sys.exit(code)
        print("/tmp/resolved-model-folder", flush=True)
        sys.exit(0)

    if opts.role == "shard":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(f"{opts.uds}-{rank}")
    else:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", opts.port))
    server.listen(16)

    def accept_forever():
        while True:
            conn, _ = server.accept()
            conn.close()

    threading.Thread(target=accept_forever, daemon=True).start()
    print(f"{name} listening", flush=True)
    if opts.exit_after is not None:
        time.sleep(opts.exit_after)
        print(f"{name} exiting with {code}", file=sys.stderr, flush=True)
        sys.exit(code)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
