"""Where the project is and how commands start their children: the one home of these rules.

Commands (retrain, add_data, schedule, ...) and stages find the project root, the virtualenv's
tools, the DVC remotes and the local archive mirror here, so no module reaches into a sibling for
a constant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from pipeline.core.errors import PipelineError

CONFIG_DIR = "conf"  # Hydra's config groups, composed into params.yaml
MIRROR_ENV = "FMNIST_MIRROR"
EXTRA_DVC_FILE = "data.dvc"  # tracks data/extra: newly labelled images
RETRAIN_LOG = Path("logs") / "retrain.log"  # every retraining cycle appends here
# Offline machines keep a copy of the four archives beside the checkout.
SHARED_MIRROR = Path("..") / "shared" / "fashion-mnist"
EXPERIMENT_COPY = (".dvc", "tmp", "exps")


class CommandError(PipelineError):
    """A command cannot go on; `step` names what failed, for a one-line report."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


def find_repo_root(start: str | Path) -> Path:
    """The nearest directory at or above `start` that holds dvc.yaml: where stages must run."""
    start = Path(start).absolute()
    for directory in (start, *start.parents):
        if (directory / "dvc.yaml").is_file():
            return directory
    raise CommandError("find repository", f"no dvc.yaml in {start} or any parent directory")


def project_root(cwd: Path | None = None) -> Path:
    """The checkout a process works for, even inside a `dvc exp run --temp/--queue` copy.

    DVC runs those experiments in `<project>/.dvc/tmp/exps/<copy>/`: the project's store and
    mirror are those of `<project>`, not of the throw-away copy.
    """
    cwd = (cwd or Path.cwd()).absolute()
    parts = cwd.parts
    for i in range(1, len(parts) - 2):
        if parts[i:i + 3] == EXPERIMENT_COPY:
            return Path(*parts[:i])
    return cwd


def mirror_source(root: Path | None = None) -> str | None:
    """The archive mirror to try first: $FMNIST_MIRROR as given (a folder or a URL), else the
    `../shared/fashion-mnist` folder beside the project if it holds archives.

    FMNIST_MIRROR set but empty means no local mirror at all (tests use that).
    """
    if MIRROR_ENV in os.environ:
        return os.environ[MIRROR_ENV] or None
    shared = (project_root(root) / SHARED_MIRROR).resolve()
    return str(shared) if any(shared.glob("*.gz")) else None


def mirror_directory(root: Path | None = None) -> Path | None:
    """`mirror_source` when it is a folder on this machine (a path or a file:// URL), else None."""
    source = mirror_source(root)
    if source is None:
        return None
    parts = urlsplit(source)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if parts.scheme in ("http", "https"):
        return None
    return Path(source).absolute()


def venv_tool(name: str) -> str:
    """A console script of this interpreter's environment, so cron's bare PATH does not matter."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise CommandError(name, f"`{name}` is neither next to {sys.executable} nor on PATH")
    return found


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: stage commands (`python -m ...`) must find the venv."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env["PATH"]]) if env.get("PATH") else bin_dir
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # stage output shows up as it happens, even in a log file
    return env


def dvc_remotes(root: Path, env: dict[str, str] | None = None) -> list[str]:
    """Names of the configured DVC remotes (`dvc remote list`); empty when there are none."""
    try:
        result = subprocess.run(
            [venv_tool("dvc"), "remote", "list"], cwd=root, env=env or child_env(),
            capture_output=True, text=True,
        )
    except OSError as exc:
        raise CommandError("dvc remote list", f"cannot run dvc: {exc}") from None
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
        raise CommandError("dvc remote list", detail)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


# --- The DVC remote: one convention for make push/pull, retrain and CI ----------------------

DVC_REMOTE_ENV = "DVC_REMOTE_URL"
DVC_ENDPOINT_ENV = "DVC_REMOTE_ENDPOINT_URL"  # an S3-compatible store that is not AWS
ENV_REMOTE = "env"  # the remote's name in .dvc/config.local


def configure_env_remote(root: Path, env: dict[str, str] | None = None) -> str | None:
    """Make $DVC_REMOTE_URL (with $DVC_REMOTE_ENDPOINT_URL, if set) the default DVC remote.

    Written to .dvc/config.local, which git ignores: the remote is a setting of the machine
    (team.env, CI secrets), not of the repository. Credentials stay in the environment (for S3:
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), where DVC's plugins read them. Returns the
    remote's URL, or None when the variable is unset (the repository's own remotes apply).
    """
    env = env or child_env()
    url = env.get(DVC_REMOTE_ENV)
    if not url:
        return None
    endpoint = env.get(DVC_ENDPOINT_ENV)
    dvc = venv_tool("dvc")
    commands = [[dvc, "remote", "add", "--local", "--default", "--force", ENV_REMOTE, url],
                # Every pulled object is hashed against its name: a corrupted or substituted
                # object in the store is refused instead of checked out.
                [dvc, "remote", "modify", "--local", ENV_REMOTE, "verify", "true"]]
    if endpoint:
        commands.append([dvc, "remote", "modify", "--local", ENV_REMOTE, "endpointurl", endpoint])
    for command in commands:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
            raise CommandError("dvc remote", f"{DVC_REMOTE_ENV}={url}: {detail}")
    return url
