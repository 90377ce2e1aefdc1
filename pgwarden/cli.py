"""The `pgwarden` command (a contract: see ARCHITECTURE.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pgwarden import logs


def _cmd_proxy(args: argparse.Namespace) -> int:
    from pgwarden.api.config import ConfigError, load_config

    try:
        config = load_config(Path(args.config))
    except ConfigError as e:
        print(f"pgwarden: {e}", file=sys.stderr)
        return 2
    logs.configure(config.logging.level)
    from pgwarden_proxy.main import run

    return run(config, Path(args.config))


def _cmd_demo(args: argparse.Namespace) -> int:
    from pgwarden.demo import main as demo

    return demo(keep_running=args.keep_running)


def _not_yet(name: str, issue: str) -> int:
    print(f"pgwarden {name}: not available in this version yet ({issue})", file=sys.stderr)
    return 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgwarden", description="An access gateway for PostgreSQL (see README.md)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    proxy = sub.add_parser("proxy", help="run one proxy from a config file (the bundle)")
    proxy.add_argument("--config", required=True, help="path of the proxy config (YAML)")
    proxy.set_defaults(func=_cmd_proxy)

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace")
    scope.add_argument("--all-namespaces", action="store_true")
    op.set_defaults(func=lambda a: _not_yet("operator", "the operator is planned"))

    crds = sub.add_parser("crds", help="write the CRD YAML generated from the models")
    crds.add_argument("--out")
    crds.set_defaults(func=lambda a: _not_yet("crds", "CRD generation comes with the operator"))

    sessions = sub.add_parser("sessions", help="read recorded sessions")
    sessions.add_argument("action", choices=["list", "show", "replay", "verify"])
    sessions.add_argument("id", nargs="?")
    sessions.add_argument("--store")
    sessions.set_defaults(func=lambda a: _not_yet("sessions", "recordings come with the recorder"))

    demo = sub.add_parser("demo", help="everything on one machine: database, issuer, proxy")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="after the scripted session, keep the proxy up for your own psql",
    )
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
