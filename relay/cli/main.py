"""The `sts-relay` command: serve, config check, queue administration, policy diagnosis.

Every user mistake (bad config, unknown queue id, bad arguments) ends in one clear line on
stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from relay import __version__
from relay.config import Config, ConfigError, config_as_dict, load_config
from relay.events import EventLog

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and the answer is "no" (not found, check failed)
EXIT_USAGE = 2  # bad arguments or configuration


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sts-relay", description="Outbound SMTP relay that enforces MTA-STS (RFC 8461)."
    )
    parser.add_argument("--version", action="version", version=f"sts-relay {__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="TOML configuration file (default: $STS_RELAY_CONFIG)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("serve", help="run the relay (listener and delivery)")

    config = commands.add_parser("config", help="configuration")
    config_cmds = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = config_cmds.add_parser("check", help="validate and print the effective configuration")
    check.add_argument("--json", action="store_true", help="print JSON")

    queue = commands.add_parser("queue", help="inspect and manage the mail queue")
    queue_cmds = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text, takes_id in (
        ("list", "list queued messages and their recipients", None),
        ("show", "show one message", True),
        ("flush", "make deferred mail due now (one message, or all)", False),
        ("delete", "delete a message (no bounce is sent)", True),
        ("hold", "keep a message from being delivered", True),
        ("release", "release a held message", True),
    ):
        sub = queue_cmds.add_parser(name, help=help_text)
        if takes_id is not None:
            sub.add_argument("queue_id", nargs=None if takes_id else "?", metavar="ID")
        sub.add_argument("--json", action="store_true", help="print JSON")

    policy = commands.add_parser("policy", help="MTA-STS policies")
    policy_cmds = policy.add_subparsers(dest="action", required=True, metavar="ACTION")
    pcheck = policy_cmds.add_parser(
        "check", help="look up a domain's MTA-STS policy and check its MX hosts against it"
    )
    pcheck.add_argument("domain")
    pcheck.add_argument("--json", action="store_true", help="print JSON")
    for name, help_text in (
        ("show", "show the cached policy of a domain"),
        ("forget", "remove a domain's cached policy (it is fetched again on next use)"),
    ):
        sub = policy_cmds.add_parser(name, help=help_text)
        sub.add_argument("domain")
        sub.add_argument("--json", action="store_true", help="print JSON")

    user = commands.add_parser("user", help="SMTP AUTH users (password read from stdin)")
    user_cmds = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("add", "add a user or change its password (prompted, or one line on stdin)"),
        ("remove", "remove a user"),
    ):
        user_cmds.add_parser(name, help=help_text).add_argument("user")
    user_cmds.add_parser("list", help="list user names").add_argument(
        "--json", action="store_true", help="print JSON"
    )

    tlsrpt = commands.add_parser("tlsrpt", help="TLS reports (RFC 8460)")
    tlsrpt_cmds = tlsrpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("show", "show a day's reports and where they go, without sending"),
        ("send", "build and send a day's reports not sent yet"),
    ):
        sub = tlsrpt_cmds.add_parser(name, help=help_text)
        sub.add_argument("--day", metavar="D", help="YYYY-MM-DD, today or yesterday (default)")
        sub.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("STS_RELAY_CONFIG"), os.environ)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def _serve(cfg: Config, args: argparse.Namespace) -> int:
    from relay.app import run_until_signalled

    events = EventLog(sys.stdout, fmt=cfg.log.format, level=cfg.log.level)
    try:
        asyncio.run(run_until_signalled(cfg, events, lambda: _load(args)))
    except OSError as exc:
        print(f"sts-relay: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as exc:  # found while building (e.g. a DKIM key that cannot sign)
        print(f"sts-relay: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _config_check(cfg: Config, as_json: bool) -> int:
    settings = config_as_dict(cfg)
    if as_json:
        _print_json(settings)
        return EXIT_OK
    for section, values in settings.items():
        print(f"[{section}]")
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}")
        print()
    print("configuration OK", file=sys.stderr)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        print(f"sts-relay: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        return _serve(cfg, args)
    if args.command == "config":
        return _config_check(cfg, args.json)
    if args.command == "queue":
        from relay.cli.queue_commands import run_queue_command

        return asyncio.run(
            run_queue_command(cfg, args.action, getattr(args, "queue_id", None), args.json)
        )
    if args.command == "policy":
        from relay.cli.policy_commands import run_policy_command

        return asyncio.run(run_policy_command(cfg, args.action, args.domain, args.json))
    if args.command == "tlsrpt":
        from relay.cli.tlsrpt_commands import run_tlsrpt_command

        return asyncio.run(run_tlsrpt_command(cfg, args.action, args.day, args.json))
    if args.command == "user":
        from relay.cli.user_commands import run_user_command

        return run_user_command(
            cfg, args.action, getattr(args, "user", None), getattr(args, "json", False)
        )
    return EXIT_USAGE
