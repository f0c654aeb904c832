"""`tierkv metrics DIRECTORY --port N`: a disk store directory's figures over HTTP for Prometheus."""

from __future__ import annotations

import argparse
import sys
import time

from ..errors import TierKVError


def run_metrics(args: argparse.Namespace) -> int:
    from ..metrics import serve_directory

    try:
        server, port = serve_directory(args.directory, args.port, args.host)
    except OSError as e:
        raise TierKVError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"tierkv metrics: serving {args.directory} at http://{args.host}:{port}/metrics (Ctrl-C stops)", flush=True)
    print("  (what the directory holds; the live counters of the store that has it open are served by that "
          "process: StoreConfig(metrics_port=...), see docs/metrics.md)", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        server.shutdown()
        server.server_close()
