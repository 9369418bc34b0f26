"""Team mode: start, stop or inspect the shared MLflow server, S3 store and PostgreSQL.

Usage: python -m pipeline.commands.team up|down|status|check|user NAME [--permission READ]
       python -m pipeline.commands.team remove-user NAME
(`make team-up`, `make team-down`, `make team-status`, `make team-user NAME=... PERMISSION=...`,
`make team-user-remove NAME=...`)

`up` starts, on this machine and on 127.0.0.1 unless --host says otherwise, whatever is not
running yet, waits until each part answers and writes `team.env` (mode 600), the `export` lines a
client sources (`. ./team.env`). `down` stops exactly what `up` started; the data stays in the
state folder (`.team/`). The stack itself, part by part, is in `pipeline.team`. `check` is the
preflight of `make train` (`pipeline.commands.preflight`), kept under its old name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.support import config, errors, store
from pipeline.support.workspace import CommandError, project_root
from pipeline.team.lifecycle import down, status, up
from pipeline.team.settings import DEFAULT_BASE_PORT, ENV_FILE, PORT_OFFSETS, STATE_DIR, load_stack
from pipeline.team.users import add_user, remove_user


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.team",
                                     description="Start, stop or inspect the team stack.")
    parser.add_argument("command", choices=("up", "down", "status", "check", "user",
                                                "remove-user"))
    parser.add_argument("name", nargs="?", help="user: the account to create")
    parser.add_argument("--permission", default="READ", help="user: READ, EDIT or MANAGE")
    parser.add_argument("--state", type=Path, default=None,
                        help=f"state folder (default: <project>/{STATE_DIR})")
    parser.add_argument("--env-file", type=Path, default=None,
                        help=f"client settings written by up (default: <project>/{ENV_FILE})")
    parser.add_argument("--host", default=None,
                        help="address to listen on, fixed by the first up (default: 127.0.0.1; "
                             "0.0.0.0 opens the stack to the network)")
    parser.add_argument("--base-port", type=int, default=None,
                        help=f"first of {len(PORT_OFFSETS)} consecutive ports, fixed by the first "
                             f"up (default {DEFAULT_BASE_PORT})")
    parser.add_argument("--params", default=config.PARAMS_FILE)
    args = parser.parse_args(argv)
    root = project_root()
    try:
        if args.command == "check":
            uri = store.preflight(config.load(args.params).mlflow)
            print(f"team: the tracking store {uri} answers")
            return 0
        state = (args.state or root / STATE_DIR).absolute()
        if args.command != "up" and not (state / "stack.json").is_file():
            print(f"team: no stack in {state} (`make team-up` creates one)")
            return 0 if args.command in ("down", "status") else 1
        stack = load_stack(state, args.host, args.base_port)
        if args.command == "up":
            up(stack, (args.env_file or root / ENV_FILE).absolute())
        elif args.command == "down":
            down(stack)
        elif args.command == "status":
            return 0 if status(stack) else 3
        elif not args.name:
            parser.error(f"{args.command} needs a NAME")
        elif args.command == "remove-user":
            remove_user(stack, args.name)
        else:
            add_user(stack, args.name, args.permission.upper(), config.load(args.params).mlflow)
    except (CommandError, config.ConfigError, store.StoreUnavailable) as exc:
        errors.show_traceback(exc)
        print(f"team: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
