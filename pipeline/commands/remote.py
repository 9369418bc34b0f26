"""`make push` / `make pull`: dvc push / dvc pull with the remote from $DVC_REMOTE_URL.

Usage: python -m pipeline.commands.remote push|pull

The remote is set by `pipeline.support.workspace.configure_env_remote`, the convention that
`make retrain` and `.github/workflows/retrain.yml` share: $DVC_REMOTE_URL, plus
$DVC_REMOTE_ENDPOINT_URL for an S3-compatible store, credentials in the environment (team mode:
`. ./team.env`). Without it, the repository's own default remote is used.

A failed push loses nothing: every object stays in the local DVC cache, and DVC uploads only
what the remote lacks, so the next push completes the job. `pull` tolerates outputs that were
never pushed (`--allow-missing`): a first retraining cycle finds an empty remote.

Pulls are verified: the remote has `verify = true`, so DVC hashes every object it downloads and
refuses one that does not match its name (a flipped byte, a substituted model). DVC then leaves
that output out of the workspace, and `--allow-missing` would let it pass in silence: after the
pull, `dvc status --cloud` names every output the remote holds but the cache still lacks, and
`pull` fails naming them.
"""

from __future__ import annotations

import argparse
import json
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
    if code == 0 and direction == "pull":
        refused = refused_outputs(root, env)
        if refused:
            raise CommandError(direction, f"{', '.join(refused)}: the copy in {where} does not "
                                          "match its hash in dvc.lock / the .dvc file (corrupted "
                                          "or replaced in the store), so it was not checked out; "
                                          "push a good copy from a clone that has it (`make "
                                          "push`), then rerun `make pull`")
    if code != 0:
        lost = ("nothing is lost: the local DVC cache keeps every object; rerun `make push` "
                "once the store answers" if direction == "push" else
                "rerun `make pull` once the store answers")
        raise CommandError(direction, f"dvc {direction} exited with code {code} against {where} "
                                      f"(its output is above): is the object store up and are "
                                      f"its credentials set? {lost}")


def refused_outputs(root: Path, env: dict[str, str]) -> list[str]:
    """Outputs the remote holds but the local cache lacks after a pull: the objects verification
    refused (or that could not be downloaded)."""
    result = subprocess.run([venv_tool("dvc"), "status", "--cloud", "--json"], cwd=root, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError("pull", f"dvc status --cloud exited with code {result.returncode}: "
                                   f"{(result.stderr or result.stdout).strip()[-300:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    status = json.loads(lines[-1]) if lines else {}
    return sorted(name for name, state in status.items() if state == "deleted")


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
