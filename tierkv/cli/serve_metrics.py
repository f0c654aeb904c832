"""`tierkv metrics DIRECTORY --port N`: a disk store directory's figures over HTTP for Prometheus."""

from __future__ import annotations

import argparse
import sys
import time


def run_metrics(args: argparse.Namespace) -> int:
    from ..metrics import local_url, serve_directory

    server, port = serve_directory(args.directory, args.port, args.host)  # ConfigError naming --port or --host
    print(f"tierkv metrics: serving {args.directory} at {local_url(args.host, port)} (listening on {args.host}; "
          "Ctrl-C stops)", flush=True)
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
