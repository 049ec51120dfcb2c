"""`python -m kube_double --port P --state DIR --config FILE.json [--cleanup]` (as root).

Serves until SIGTERM or SIGINT (exit status 0 when everything was removed from
the host, 1 if something was left, 2 if it could not start). With `--cleanup`
it only removes what a crashed double with this state folder and config left,
and prints what it could not remove.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import config as config_file
from .server import Busy, clean, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kube_double", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    parser.add_argument("--state", type=Path, required=True, help="the double's own folder")
    parser.add_argument("--config", type=Path, required=True, help="the JSON config file")
    parser.add_argument("--cleanup", action="store_true", help="only clean up after a crash")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING...")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if os.geteuid() != 0:
        print("kube double: needs root (network namespaces, mounts, runsc)", file=sys.stderr)
        return 2
    try:
        config = config_file.load(args.config)
    except (OSError, ValueError) as e:
        print(f"kube double: config: {e}", file=sys.stderr)
        return 2
    state = args.state.resolve()
    if not args.cleanup:
        return serve(config, state, args.port)
    try:
        left = clean(config, state)
    except Busy as e:
        print(f"kube double: {e}", file=sys.stderr)
        return 2
    for line in left:
        print(line)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
