"""The `sts-relay` command: serve, health, config check, queue administration, policy
diagnosis, SMTP AUTH users, TLS reports.

Every user mistake (bad config, unknown queue id, bad arguments) ends in one clear line on
stderr and a non-zero exit status, never a traceback; with `--json` the answer is JSON on
stdout even then (relay/cli/output.py). `--config PATH` is accepted before or after the
subcommand. The commands that read the state (`queue`, `tlsrpt`, `policy show|forget|
history`, and `user` with the users file in the state directory) need an existing store
and never create one: `serve` alone does.

`serve` reports a failure to start (configuration, state directory already served or not
writable, port in use, certificate) as a `start_failed` event in its own log stream, then
exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any, ClassVar, NoReturn

from mailqueue.store import StoreUnavailable
from relay import __version__
from relay.cli.output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, fail, print_json
from relay.cli.queue_commands import CHANGES, STATES, QueueRequest, selection_of
from relay.config import Config, ConfigError, load_config
from relay.events import EventLog
from relay.state import NoState, StateBusy, existing_store

_NO_STATE_HINT = "`sts-relay serve` creates it; check state.path and --config"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are JSON too when `--json` was given."""

    json_errors: ClassVar[bool] = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            print_json({"error": message})
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="answer in JSON (errors too)")


def _parser() -> argparse.ArgumentParser:
    # --config on every subcommand too; SUPPRESS keeps one given before the subcommand.
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="TOML file")
    parser = _Parser(
        prog="sts-relay", description="Outbound SMTP relay that enforces MTA-STS (RFC 8461)."
    )
    parser.add_argument("--version", action="version", version=f"sts-relay {__version__}")
    parser.add_argument(
        "--config", metavar="PATH", help="TOML configuration file (default: $STS_RELAY_CONFIG)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, parents=[common])
        return sub.add_subparsers(dest="action", required=True, metavar="ACTION")

    commands.add_parser("serve", help="run the relay (listener and delivery)", parents=[common])
    commands.add_parser(
        "health", help="exit 0 when the configured relay takes mail (HEALTHCHECK)", parents=[common]
    )
    check = group("config", "configuration").add_parser(
        "check", help="validate and print the effective configuration as TOML", parents=[common]
    )
    _add_json(check)
    _queue_parsers(group("queue", "inspect and manage the mail queue"), common)
    policy = group("policy", "MTA-STS policies")
    for name, help_text in (
        ("check", "look up a domain's MTA-STS policy and check its MX hosts against it"),
        ("show", "show the cached policy of a domain"),
        ("forget", "remove a domain's cached policy (it is fetched again on next use)"),
        ("history", "show the changes of a domain's policy kept in the store"),
    ):
        sub = policy.add_parser(name, help=help_text, parents=[common])
        sub.add_argument("domain")
        _add_json(sub)
    user = group("user", "SMTP AUTH users (password read from stdin)")
    for name, help_text in (
        ("add", "add a user or change its password (prompted, or one line on stdin)"),
        ("remove", "remove a user"),
    ):
        user.add_parser(name, help=help_text, parents=[common]).add_argument("user")
    _add_json(user.add_parser("list", help="list user names", parents=[common]))
    tlsrpt = group("tlsrpt", "TLS reports (RFC 8460)")
    for name, help_text in (
        ("show", "show a day's reports and where they go, without sending"),
        ("send", "build and send a day's reports not sent yet"),
    ):
        sub = tlsrpt.add_parser(name, help=help_text, parents=[common])
        sub.add_argument("--day", metavar="D", help="YYYY-MM-DD, today or yesterday (default)")
        _add_json(sub)
    posture = group("report", "reports on how the relay's mail left").add_parser(
        "tls", help="TLS posture by mechanism, domain and day", parents=[common]
    )
    period = posture.add_mutually_exclusive_group()
    period.add_argument("--since", metavar="DURATION", help="7d (default), 36h, 2w ...")
    period.add_argument("--day", metavar="D", help="YYYY-MM-DD, today or yesterday")
    posture.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    _add_json(posture)
    return parser


def _queue_parsers(queue: Any, common: argparse.ArgumentParser) -> None:
    show = queue.add_parser("show", help="show one message", parents=[common])
    show.add_argument("queue_id", metavar="ID")
    _add_json(show)
    for name, help_text in (
        ("list", "list queued messages (all, or a selection)"),
        ("flush", "make waiting recipients due now (all, or a selection)"),
        ("delete", "delete messages (no report to the sender)"),
        ("hold", "keep messages from delivery"),
        ("release", "release held messages"),
        ("bounce", "give up on messages now and report to their senders"),
    ):
        sub = queue.add_parser(name, help=help_text, parents=[common])
        sub.add_argument("queue_ids", nargs="*", metavar="ID")
        sub.add_argument("--domain", help="a recipient at this domain is still waiting")
        sub.add_argument(
            "--sender", metavar="ADDRESS", help='envelope sender; "<>" for bounces, "@domain"'
        )
        sub.add_argument("--state", choices=STATES, help="where the message or a recipient is")
        sub.add_argument("--all", dest="everything", action="store_true", help="whole queue")
        _add_json(sub)
    assert set(CHANGES) <= set(queue.choices)  # noqa: S101 (every store action has a command)


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config or os.environ.get("STS_RELAY_CONFIG"), os.environ)


def _serve(args: argparse.Namespace) -> int:
    from relay.app import run_until_signalled
    from relay.event_loop import run_loop
    from relay.processes.shares import process_count
    from relay.processes.supervisor import serve_processes

    try:
        cfg = _load(args)
    except ConfigError as exc:
        EventLog(sys.stdout).start_failed(reason=f"configuration error: {exc}")
        return fail(f"configuration error: {exc}", EXIT_USAGE)
    events = EventLog(sys.stdout, fmt=cfg.log.format, level=cfg.log.level)
    serving: list[str] = []
    events.subscribe(lambda event, _fields: serving.append(event) if event == "listening" else None)
    status = EXIT_FAILURE
    try:
        count = process_count(cfg.serve.processes)
        if count > 1:
            serve_processes(cfg, events, lambda: _load(args), count)
        else:
            run_loop(run_until_signalled(cfg, events, lambda: _load(args)), cfg.serve.event_loop)
    except StateBusy as exc:
        reason = str(exc)
    except ConfigError as exc:  # found while building (e.g. a DKIM key that cannot sign)
        reason, status = f"configuration error: {exc}", EXIT_USAGE
    except (StoreUnavailable, sqlite3.Error) as exc:
        reason = f"state {cfg.state.path}: {exc}"
    except OSError as exc:  # a port in use, a certificate, a state directory not writable
        reason = str(exc)
    else:
        return EXIT_OK
    if serving:
        return fail(f"stopped by an error: {reason}", status)
    events.start_failed(reason=reason)
    return fail(f"cannot start: {reason}", status)


def _needs_store(args: argparse.Namespace, cfg: Config) -> bool:
    if args.command in ("queue", "tlsrpt", "report"):
        return True
    # `user` checks for itself, after its usage checks (relay/cli/user_commands.py).
    return args.command == "policy" and bool(args.action != "check")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    args = _parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    if args.command == "serve":
        return _serve(args)
    try:
        cfg = _load(args)
    except ConfigError as exc:
        return fail(f"configuration error: {exc}", EXIT_USAGE, as_json=as_json)
    if args.command == "config":
        from relay.cli.config_commands import run_config_check

        try:
            return run_config_check(cfg, args.config, os.environ, as_json)
        except (ConfigError, OSError) as exc:
            return fail(f"configuration error: {exc}", EXIT_USAGE, as_json=as_json)
    if args.command == "health":
        from relay.cli.health import run_health

        return run_health(cfg)
    if args.command == "queue" and args.action != "show":
        selection = selection_of(_queue_request(args, as_json))
        if isinstance(selection, str):  # a usage mistake is said before anything is opened
            return fail(selection, EXIT_USAGE, as_json=as_json)
    if _needs_store(args, cfg) and not cfg.state.url:  # a shared database is never created here
        try:
            existing_store(cfg.state.path)
        except NoState as exc:
            return fail(f"{exc} ({_NO_STATE_HINT})", EXIT_FAILURE, as_json=as_json)
    return _run(args, cfg, as_json)


def _queue_request(args: argparse.Namespace, as_json: bool) -> QueueRequest:
    return QueueRequest(
        action=args.action,
        queue_ids=(args.queue_id,) if args.action == "show" else tuple(args.queue_ids),
        domain=getattr(args, "domain", None),
        sender=getattr(args, "sender", None),
        state=getattr(args, "state", None),
        everything=getattr(args, "everything", False),
        as_json=as_json,
    )


def _run(args: argparse.Namespace, cfg: Config, as_json: bool) -> int:
    if args.command == "queue":
        from relay.cli.queue_commands import run_queue_command

        return asyncio.run(run_queue_command(cfg, _queue_request(args, as_json)))
    if args.command == "policy":
        from relay.cli.policy_commands import run_policy_command

        return asyncio.run(run_policy_command(cfg, args.action, args.domain, as_json))
    if args.command == "tlsrpt":
        from relay.cli.tlsrpt_commands import run_tlsrpt_command

        return asyncio.run(run_tlsrpt_command(cfg, args.action, args.day, as_json))
    if args.command == "user":
        from relay.cli.user_commands import run_user_command

        return run_user_command(cfg, args.action, getattr(args, "user", None), as_json)
    if args.command == "report":
        from relay.cli.report_commands import run_report_command

        request = {"since": args.since, "day": args.day, "html": args.html}
        return asyncio.run(run_report_command(cfg, **request, as_json=as_json))
    return EXIT_USAGE
