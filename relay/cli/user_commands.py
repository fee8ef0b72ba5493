"""`sts-relay user add|remove|list`: the SMTP AUTH users file, edited by operators.

Owns reading the new password (from a terminal with getpass, asked twice, or one line from
stdin for scripts; never from the command line, where `ps` and shell history would show it)
and the one-line outcomes. The file format and hashing are relay/users.py's. A running relay
picks changes up at the next login: it re-reads the file when it changes. With the users file
in the state directory (the default), the state must exist: no command but `serve` creates
it (a user added to a new `./var` of the wrong directory would never log in).
"""

from __future__ import annotations

import getpass
import json
import sys
from typing import TextIO

from relay.cli.output import fail
from relay.config import Config, users_file_path
from relay.state import NoState, existing_store
from relay.users import UsersFileError, hash_password, read_users, valid_user_name, write_users

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class _NoPassword(Exception):
    pass


def _read_password(stdin: TextIO) -> str:
    if stdin.isatty():
        first = getpass.getpass("New password: ")
        if getpass.getpass("Repeat password: ") != first:
            raise _NoPassword("the passwords differ")
        password = first
    else:
        password = stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise _NoPassword("empty password")
    return password


def _no_state(cfg: Config, as_json: bool = False) -> int | None:
    """The failure to report when the users file belongs in a state that does not exist."""
    if cfg.auth.users_file:
        return None
    try:
        existing_store(cfg.state.path)
    except NoState as exc:
        hint = "`sts-relay serve` creates it; check state.path and --config"
        return fail(f"{exc} ({hint})", as_json=as_json)
    return None


def _add(cfg: Config, name: str, stdin: TextIO) -> int:
    if not valid_user_name(name):
        print(f"sts-relay: bad user name {name!r} (printable ASCII, no ':')", file=sys.stderr)
        return EXIT_USAGE
    if (failed := _no_state(cfg)) is not None:
        return failed
    try:
        password = _read_password(stdin)
    except _NoPassword as exc:
        print(f"sts-relay: {exc}; user {name} not changed", file=sys.stderr)
        return EXIT_USAGE
    path = users_file_path(cfg)
    users = read_users(path)
    existed = name in users
    users[name] = hash_password(password)
    write_users(path, users)
    print(f"user {name} {'updated' if existed else 'added'} in {path}", file=sys.stderr)
    return EXIT_OK


def _remove(cfg: Config, name: str) -> int:
    if (failed := _no_state(cfg)) is not None:
        return failed
    path = users_file_path(cfg)
    users = read_users(path)
    if users.pop(name, None) is None:
        print(f"sts-relay: no user {name!r} in {path}", file=sys.stderr)
        return EXIT_FAILURE
    write_users(path, users)
    print(f"user {name} removed from {path}", file=sys.stderr)
    return EXIT_OK


def _list(cfg: Config, as_json: bool) -> int:
    if (failed := _no_state(cfg, as_json)) is not None:
        return failed
    path = users_file_path(cfg)
    names = sorted(read_users(path))
    if as_json:
        print(json.dumps(names, indent=2))
    else:
        for name in names:
            print(name)
    if not names:
        why = "" if path.exists() else " (the file does not exist yet)"
        print(f"no users in {path}{why}: add one with `sts-relay user add NAME`", file=sys.stderr)
    return EXIT_OK


def run_user_command(
    cfg: Config, action: str, name: str | None, as_json: bool, stdin: TextIO | None = None
) -> int:
    """Run `user add|remove NAME` or `user list`; the exit status."""
    try:
        if action == "add" and name is not None:
            return _add(cfg, name, stdin or sys.stdin)
        if action == "remove" and name is not None:
            return _remove(cfg, name)
        if action == "list":
            return _list(cfg, as_json)
    except UsersFileError as exc:
        return fail(str(exc), as_json=as_json)
    return EXIT_USAGE
