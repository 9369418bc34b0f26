"""`make push` / `make pull`: dvc push / dvc pull with the remote from $DVC_REMOTE_URL.

Usage: python -m pipeline.commands.remote push|pull

The remote is set by `pipeline.support.workspace.configure_env_remote`, the convention that
`make retrain` and `.github/workflows/retrain.yml` share: $DVC_REMOTE_URL, plus
$DVC_REMOTE_ENDPOINT_URL for an S3-compatible store, credentials in the environment (team mode:
`. ./team.env`). Without it, the repository's own default remote is used.

A failed push loses nothing: every object stays in the local DVC cache, and DVC uploads only
what the remote lacks, so the next push completes the job. `pull` tolerates outputs that were
never pushed (`--allow-missing`): a first retraining cycle finds an empty remote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.support import errors
from pipeline.support.workspace import (
    DVC_ENDPOINT_ENV,
    DVC_REMOTE_ENV,
    CommandError,
    child_env,
    configure_env_remote,
    dvc_remotes,
    find_repo_root,
    venv_tool,
)

ARGUMENTS = {"push": ("push",), "pull": ("pull", "--allow-missing")}


def sync(direction: str, root: Path) -> None:
    """Run `dvc push` or `dvc pull` in `root`; CommandError saying what to do if it fails."""
    env = child_env()
    url = configure_env_remote(root, env)
    if url is None and not dvc_remotes(root, env):
        raise CommandError(direction, f"no DVC remote: set {DVC_REMOTE_ENV} (team mode: "
                                      "`. ./team.env`) or add one with `dvc remote add -d`")
    where = (f"{DVC_REMOTE_ENV}={url}" + (f" at {env[DVC_ENDPOINT_ENV]}"
                                          if env.get(DVC_ENDPOINT_ENV) else "")
             if url else "the repository's default DVC remote")
    print(f"{direction}: {where}", flush=True)
    code = subprocess.run([venv_tool("dvc"), *ARGUMENTS[direction]], cwd=root, env=env).returncode
    if code != 0:
        lost = ("nothing is lost: the local DVC cache keeps every object; rerun `make push` "
                "once the store answers" if direction == "push" else
                "rerun `make pull` once the store answers")
        raise CommandError(direction, f"dvc {direction} exited with code {code} against {where} "
                                      f"(its output is above): is the object store up and are "
                                      f"its credentials set? {lost}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.commands.remote",
                                     description="dvc push / pull with the remote of "
                                                 f"${DVC_REMOTE_ENV}.")
    parser.add_argument("direction", choices=sorted(ARGUMENTS))
    args = parser.parse_args(argv)
    try:
        sync(args.direction, find_repo_root(os.getcwd()))
    except CommandError as exc:
        errors.show_traceback(exc)
        print(f"{args.direction}: error: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
