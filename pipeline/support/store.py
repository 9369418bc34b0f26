"""Which MLflow tracking store and registered model the project uses: one rule for every command.

The store is `mlflow.tracking_uri` of the configuration unless $MLFLOW_TRACKING_URI is set, as
everywhere in MLflow. Stages, predict, serve, ui, retrain and register's lock all ask here, so
renaming the registered model or moving the store in `conf/` moves every command with it.

A local sqlite store is checked (`PRAGMA quick_check`) before MLflow opens it, so a damaged
`mlflow.db` is one line naming the file and how to restore it, not a SQLAlchemy traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import ssl
import urllib.error
import urllib.request
import warnings
from base64 import b64encode
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.core.errors import PipelineError
from pipeline.support.config import MlflowConfig
from pipeline.support.errors import USERNAME_ENV  # noqa: F401 - store.USERNAME_ENV, the rule
from pipeline.support.workspace import project_root

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
TOKEN_ENV = "MLFLOW_TRACKING_TOKEN"
AUTH_PLUGIN_ENV = "MLFLOW_TRACKING_AUTH"
PREFLIGHT_TIMEOUT = 5.0  # seconds; with the answer's parsing, well under the promised 10 s
CHAMPION = "champion"
CHALLENGER = "challenger"
# MLflow 3's UI opens an experiment by its kind; without the tag it guesses, and opens GenAI
# pages (traces, the assistant). Model training is the kind the UI calls custom model
# development: it opens on the runs list.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"

# Before mlflow is imported: no telemetry, no progress bars in DVC's logs, and a tracking server
# that is down fails in seconds instead of minutes of retries with back-off.
_MLFLOW_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # MLflow sets its logger's level when imported; INFO ("Detected uv project", "Waiting up to
    # 300 seconds for model version...") says nothing a user acts on. MLFLOW_LOGGING_LEVEL=INFO
    # brings it back.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Against a server, MLflow prints "View run ... / View experiment ..." at every run's end:
    # two lines per stage and per trial. The summary and `make runs` say where the runs are.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def local_store_path(tracking_uri: str) -> Path | None:
    """The file or folder behind a local tracking URI (sqlite or file store); None for a server."""
    parts = urlsplit(tracking_uri)
    if parts.scheme == "sqlite":
        database = parts.path[1:]  # sqlite:///rel.db -> rel.db; sqlite:////abs.db -> /abs.db
        return Path(database) if database and database != ":memory:" else None
    if parts.scheme in ("", "file"):
        return Path(parts.path)
    return None


class StoreError(PipelineError, RuntimeError):
    """The tracking store cannot be used as it is; the message says how to restore it."""


def check_integrity(uri: str) -> None:
    """A local sqlite store must pass `PRAGMA quick_check`; StoreError names it and the remedy.

    Read-only and quick (it skips the index cross-checks of `integrity_check`); a store that does
    not exist yet is fine: MLflow creates it.
    """
    path = local_store_path(uri)
    if urlsplit(uri).scheme != "sqlite" or path is None or not path.is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        raise StoreError(
            f"the MLflow store {path} is damaged ({'; '.join(problems[:3])}). Restore it from a "
            f"backup (copy {path.name} before each `mlflow db upgrade`), or recover what can "
            f"be read: sqlite3 {path} .recover | sqlite3 {path}.recovered && mv {path} "
            f"{path}.damaged && mv {path}.recovered {path}")


def tracking_uri(cfg: MlflowConfig) -> str:
    """$MLFLOW_TRACKING_URI, else the configured store; a relative sqlite file is the project's.

    Anchored at the project root so that `dvc exp run --temp` and `--queue`, which run the
    stages in a copy under .dvc/tmp/exps/, log to the project's store and registry.
    """
    uri = os.environ.get(TRACKING_URI_ENV) or cfg.tracking_uri
    store = local_store_path(uri)
    if urlsplit(uri).scheme == "sqlite" and store is not None and not store.is_absolute():
        root = project_root()
        if root != Path.cwd().absolute():
            return f"sqlite:///{root / store}"
    return uri


def redact_url(url: str) -> str:
    """A database or server URL without its password, for messages and tags."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def is_local(uri: str) -> bool:
    return urlsplit(uri).scheme in ("sqlite", "file", "")


def model_uri(cfg: MlflowConfig, alias: str = CHAMPION) -> str:
    """`models:/<registered model>@<alias>`: the champion unless another alias is named."""
    return f"models:/{cfg.registered_model}@{alias}"


def quiet_mlflow() -> None:
    """The defaults above, and MLflow's INFO chatter off; call before the first mlflow import."""
    for key, value in _MLFLOW_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # uv's virtualenvs have no pip; MLflow warns about it on every logged model.
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")


class StoreUnavailable(PipelineError, ConnectionError):
    """The tracking server cannot be reached or refuses us; the message says what to do."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would send our Authorization header to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201
        raise urllib.error.HTTPError(req.full_url, code, f"redirected to {newurl}, not followed",
                                     headers, fp)


INSECURE_TLS_ENV = "MLFLOW_TRACKING_INSECURE_TLS"
SERVER_CERT_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"
CLIENT_CERT_ENV = "MLFLOW_TRACKING_CLIENT_CERT_PATH"


@functools.lru_cache(maxsize=4)
def _tls_context(insecure: str, server_cert: str, client_cert: str) -> ssl.SSLContext:
    """TLS as MLflow's client sets it up from the same variables (a private CA, a client
    certificate, or no verification at all when the user asks for that); made once per
    process and settings, as loading the CA bundle is the slow part."""
    if insecure.strip().lower() in ("true", "1"):
        context = ssl._create_unverified_context()  # noqa: S323 (the user's explicit choice)
    else:
        context = ssl.create_default_context(cafile=server_cert or None)
    if client_cert:
        context.load_cert_chain(client_cert)
    return context


def open_url(request: urllib.request.Request, timeout: float):
    """urlopen for requests that carry credentials: redirects are not followed, and TLS
    follows MLflow's variables."""
    handlers: list[urllib.request.BaseHandler] = [_NoRedirects()]
    if request.type == "https":
        context = _tls_context(*(os.environ.get(key, "") for key in (
            INSECURE_TLS_ENV, SERVER_CERT_ENV, CLIENT_CERT_ENV)))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    return urllib.request.build_opener(*handlers).open(request, timeout=timeout)


def auth_headers() -> dict[str, str]:
    """The credentials MLflow's client would send: basic auth, else a bearer token."""
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if user and password:
        return {"Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode()}
    if os.environ.get(TOKEN_ENV):
        return {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}
    return {}


def check_server(uri: str, timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Before any work: a tracking server must answer, and accept our credentials, in seconds.

    MLflow's own client would retry with back-off (minutes) and then print a traceback; one
    bounded request gives a one-line answer instead. A local store needs no check.
    """
    if is_local(uri):
        return
    request = urllib.request.Request(
        uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1",
        headers=auth_headers())
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    try:
        with open_url(request, timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403) and os.environ.get(AUTH_PLUGIN_ENV):
            return  # an MLflow auth plugin signs the client's requests; this check cannot
        if exc.code == 401:
            who = f"the password of user {user!r} was refused" if user and password else (
                f"{USERNAME_ENV} and {PASSWORD_ENV} are not both set")
            raise StoreUnavailable(
                f"the MLflow tracking server {uri} wants credentials: {who}; set "
                f"{USERNAME_ENV} and {PASSWORD_ENV} (team mode: `. ./team.env`)") from None
        if exc.code == 403:
            raise StoreUnavailable(
                f"the MLflow tracking server {uri} refuses user {user!r} ({USERNAME_ENV}): ask "
                "its admin for permission (`make team-user`)") from None
        raise StoreUnavailable(f"the MLflow tracking server {uri} answered HTTP {exc.code} "
                               f"{exc.reason}: is {TRACKING_URI_ENV} an MLflow server?") from None
    except (urllib.error.URLError, OSError) as exc:
        raise StoreUnavailable(unreachable(uri, getattr(exc, "reason", exc))) from None


def unreachable(uri: str, reason: object) -> str:
    """The one line for a tracking server that does not answer, before or during a command."""
    return (f"cannot reach the MLflow tracking server {uri} ({reason}): start it (team mode: "
            f"`make team-up`) or set {TRACKING_URI_ENV} to a running server, then rerun (a "
            "run left open is closed as FAILED and redone)")


# What MLflow's HTTP client says when the server went away mid-command (after its retries).
_CONNECTION_FAULTS = ("Max retries exceeded", "Failed to establish a new connection",
                      "Connection refused", "Connection reset", "RemoteDisconnected",
                      "Connection aborted", "Read timed out")


def server_fault(exc: BaseException) -> str | None:
    """`unreachable`'s line for an error that is a lost tracking server, else None.

    MLflow wraps a connection failure in an MlflowException whose message holds the
    urllib3/requests text; requests' own ConnectionError can come through too.
    """
    uri = os.environ.get(TRACKING_URI_ENV)
    if not uri or is_local(uri):
        return None
    seen: BaseException | None = exc
    while seen is not None:
        text = str(getattr(seen, "message", None) or seen)
        if any(fault in text for fault in _CONNECTION_FAULTS):
            reason = ("connection refused" if "refused" in text else
                      "timed out" if "timed out" in text else "connection lost")
            return unreachable(uri, reason)
        seen = seen.__cause__ or seen.__context__
    return None


def connect(cfg: MlflowConfig, experiment: bool = True) -> str:
    """Point MLflow at the project's store (and experiment); returns the tracking URI.

    A tracking server is checked first (`check_server`), so a server that is down or refuses
    the credentials fails in seconds with a line that says what to do; a local sqlite store must
    pass `check_integrity`.
    """
    quiet_mlflow()
    uri = tracking_uri(cfg)
    check_server(uri)
    import mlflow

    check_integrity(uri)
    mlflow.set_tracking_uri(uri)
    if experiment:
        declare_training(mlflow.set_experiment(cfg.experiment))
    return uri


def declare_training(experiment) -> None:  # noqa: ANN001 - mlflow.entities.Experiment
    """Tag the experiment as model training (`TRAINING_KIND`), once: the UI then opens it on its
    runs. A user who may not edit the experiment (a team server's READ) leaves it as it is."""
    if experiment.tags.get(EXPERIMENT_KIND_TAG) == TRAINING_KIND:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                          TRAINING_KIND)
    except MlflowException as exc:
        if exc.error_code == "PERMISSION_DENIED":
            return
        # Two processes tagging at once: MLflow's SQL store inserts the tag without an upsert,
        # so the second insert breaks the unique key. The tag is there: that is all we need.
        tagged = MlflowClient().get_experiment(experiment.experiment_id).tags
        if tagged.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
            raise


def preflight(cfg: MlflowConfig) -> str:
    """The project's tracking URI, once its server (if it has one) answered `check_server`:
    what `make train` checks before `dvc repro`."""
    uri = tracking_uri(cfg)
    check_server(uri)
    return uri
