"""The model registry, read without MLflow's client, so `predict` answers in about a second.

Importing MLflow with its SQL store takes about 2 s, more than everything else `predict` does.
Pinning `models:/NAME@alias` or `models:/NAME/N` to a version and reading the version's files
takes a few reads: read-only SQL on the embedded sqlite store, or MLflow's REST API on a
tracking server (the same requests its client sends). What is read is then checked as every
other model is (`model_loader.load_model_files`: the MLmodel file first, then the skops file with
the trusted types).

This reader covers what the pipeline itself sets up. Anything else raises `Unsupported` and the
caller asks MLflow's client, which stays the authority: a file store, artifacts the server does
not proxy (an `s3://` location read with the client's own credentials), an ambiguous answer, or
a sqlite store whose schema revision (its `alembic_version`) is not one of VERIFIED_REVISIONS,
the revisions tests/test_registry_reader.py has checked the reader against MLflow's client on:
a schema that kept the columns but changed their meaning would otherwise give wrong answers.

FMNIST_REGISTRY_READER=0 turns the reader off: every registry question goes to MLflow's client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.core.errors import PipelineError
from pipeline.core.files import FileRefusedError, read_bounded
from pipeline.support import store

REQUEST_TIMEOUT = 10.0  # seconds, as MLflow's client is given (store._MLFLOW_DEFAULTS)
MAX_ANSWER_BYTES = 1 << 20  # a registry answer: a few hundred bytes
DELETED_STAGE = "Deleted_Internal"  # how MLflow's SQL store marks a deleted version
DEFAULT_WORKSPACE = "default"
# The schema revisions of MLflow's SQL store that the differential test (this reader == MLflow's
# client, tests/test_registry_reader.py) has passed on: the one MLflow 3.17.2 creates. A newer
# MLflow that migrates the store gives another revision: rerun that test, then add it here.
VERIFIED_REVISIONS = ("dc11669786a5",)
SWITCH = "FMNIST_REGISTRY_READER"  # "0": always ask MLflow's client
INTEGRITY_TAG = "model_sha256"  # model_integrity.TAG (not imported: that would pull in skops)

# Reads one file of a model version: its path inside the version's folder, and a size cap.
FileReader = Callable[[str, int], bytes]
MAX_MESSAGE_CHARS = 300  # of a server's error message shown to a user (one SQL statement: 1.5 KB)


def filter_string(name: str) -> str:
    """`name='...'` for MLflow's search filters, whose parser takes a value in single or double
    quotes and has no escape: `x'y` goes in double quotes; a name with both quotes cannot be
    written, and RegistryError says so."""
    if "'" not in name:
        return f"name='{name}'"
    if '"' not in name:
        return f'name="{name}"'
    raise RegistryError(f"the model name {name!r} holds both kinds of quote: MLflow's search "
                        "filters cannot name it")


def short(text: str) -> str:
    """A server's message in one line of at most MAX_MESSAGE_CHARS."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 3] + "..."


class Unsupported(Exception):
    """This store or this answer needs MLflow's client; the caller falls back to it."""


class RegistryError(PipelineError, RuntimeError):
    """The registry could not be read; the message says why."""


@dataclass(frozen=True)
class VersionRecord:
    """A registered model version, as much of it as loading needs."""

    name: str
    version: str
    run_id: str | None
    read: FileReader | None  # the version's files (MLmodel, the skops file); None: ask MLflow
    model_sha256: str | None = None  # its model_integrity.TAG, if registered with one


class Registry(Protocol):
    """What resolving a `models:/` URI asks of a registry."""

    def aliases(self, name: str) -> dict[str, str] | None:
        """alias -> version of the registered model `name`; None if there is no such model."""

    def versions(self, name: str) -> list[int]:
        """The version numbers of `name` that exist (deleted ones excluded), ascending."""

    def version(self, name: str, version: str) -> VersionRecord | None:
        """The version `version` of `name`; None if it does not exist (or was deleted)."""


# Settings with which MLflow's client reads another registry, or reads it another way: it is
# left to MLflow whenever one is set (the reader would otherwise answer for the wrong registry).
_CLIENT_SETTINGS = ("MLFLOW_WORKSPACE", "MLFLOW_ENABLE_WORKSPACES", "MLFLOW_TRACKING_AUTH")
_REGISTRY_URI_ENV = "MLFLOW_REGISTRY_URI"
MAX_PAGES = 100  # of 1,000 versions each, when listing a model's versions


def open_registry(tracking_uri: str) -> Registry:
    """A reader for this store, or Unsupported when only MLflow's client should read it."""
    if os.environ.get(SWITCH, "").strip().lower() in ("0", "false", "no", "off"):
        raise Unsupported(f"{SWITCH} is off")
    scheme = urllib.parse.urlsplit(tracking_uri).scheme
    for name in _CLIENT_SETTINGS:
        if os.environ.get(name, "").strip().lower() not in ("", "false", "0"):
            raise Unsupported(f"{name} is set")
    registry_uri = os.environ.get(_REGISTRY_URI_ENV, "").strip()
    if registry_uri and registry_uri != tracking_uri:
        raise Unsupported(f"the registry is {registry_uri}, not the tracking store")
    if scheme == "sqlite":
        path = store.local_store_path(tracking_uri)
        if path is None or not path.is_file():
            raise Unsupported(f"no sqlite file behind {tracking_uri}")
        return SqliteRegistry(path)
    if scheme in ("http", "https"):
        return RestRegistry(tracking_uri)
    raise Unsupported(f"{scheme or 'file'} stores are read by MLflow's client")


# --- Files --------------------------------------------------------------------------------------


def local_reader(folder: Path) -> FileReader:
    """Files of a version stored on this machine: regular files inside `folder` only (no
    symlink out of it), sizes capped."""

    def read(name: str, limit: int) -> bytes:
        path, root = (folder / name).resolve(), folder.resolve()
        if not path.is_relative_to(root):  # MLflow's client refuses these too
            how = "a symlink out of" if (folder / name).is_symlink() else "out of"
            raise RegistryError(f"{folder / name} is {how} the model's folder (to {path}): "
                                "refused")
        try:
            return read_bounded(folder / name, limit)
        except FileNotFoundError:
            raise RegistryError(f"{folder / name} is missing from the model's folder") from None
        except FileRefusedError as exc:
            raise RegistryError(str(exc)) from None
        except OSError as exc:
            raise RegistryError(f"cannot read {folder / name}: {exc.strerror or exc}") from None

    return read


def local_folder(location: str) -> Path:
    """The folder behind a version's storage location, if it is on this machine."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme == "file" and parts.netloc in ("", "localhost"):
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme == "" and location.startswith("/"):
        return Path(location)
    raise Unsupported(f"the model's files are at {location}")


# --- The embedded store ---------------------------------------------------------------------


class SqliteRegistry:
    """MLflow's registry tables in a sqlite file, opened read-only.

    The queries follow MLflow's SQL store: the default workspace, versions marked deleted are
    gone, the files are at `storage_location`, else `source`. A schema revision not in
    VERIFIED_REVISIONS, or a missing table or column (another schema), is Unsupported.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._workspaces: bool | None = None  # whether the schema has them (MLflow 3.5+)

    def _rows(self, query: str, *args: object) -> list[tuple]:
        """`query`'s rows; `{workspace}` in it becomes MLflow's default-workspace filter when
        the schema has workspaces, nothing otherwise."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                                    timeout=REQUEST_TIMEOUT)) as db:
                if self._workspaces is None:
                    self._check_revision(db)
                    self._workspaces = any(row[1] == "workspace" for row in
                                           db.execute("PRAGMA table_info(registered_models)"))
                if self._workspaces:
                    query, args = query.format(workspace="AND workspace = ?"), (
                        *args, DEFAULT_WORKSPACE)
                else:
                    query = query.format(workspace="")
                return db.execute(query, args).fetchall()
        except sqlite3.OperationalError as exc:  # no such table or column: not MLflow's schema
            raise Unsupported(f"{self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"cannot read the MLflow store {self.path}: {exc}") from None

    def _check_revision(self, db: sqlite3.Connection) -> None:
        revisions = [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]
        if len(revisions) != 1 or revisions[0] not in VERIFIED_REVISIONS:
            raise Unsupported(f"{self.path}: schema revision {', '.join(revisions) or 'none'}, "
                              f"not one the reader is verified on: {VERIFIED_REVISIONS}")

    def aliases(self, name: str) -> dict[str, str] | None:
        if not self._rows("SELECT 1 FROM registered_models WHERE name = ? {workspace}", name):
            return None
        rows = self._rows("SELECT alias, version FROM registered_model_aliases "
                          "WHERE name = ? {workspace}", name)
        return {alias: str(version) for alias, version in rows}

    def versions(self, name: str) -> list[int]:
        rows = self._rows("SELECT version FROM model_versions WHERE name = ? AND "
                          "current_stage != ? {workspace}", name, DELETED_STAGE)
        return sorted(int(row[0]) for row in rows)

    def version(self, name: str, version: str) -> VersionRecord | None:
        rows = self._rows("SELECT run_id, storage_location, source FROM model_versions "
                          "WHERE name = ? AND version = ? AND current_stage != ? {workspace}",
                          name, int(version), DELETED_STAGE)
        if not rows:
            return None
        if len(rows) > 1:
            raise Unsupported(f"{len(rows)} rows for version {version} of {name!r}")
        run_id, storage_location, source = rows[0]
        folder = local_folder(storage_location or source or "")
        digest = self._rows("SELECT value FROM model_version_tags WHERE name = ? AND version = ? "
                            "AND key = ? {workspace}", name, int(version), INTEGRITY_TAG)
        return VersionRecord(name, str(version), run_id, local_reader(folder),
                             digest[0][0] if digest else None)


# --- A tracking server ----------------------------------------------------------------------


class RestRegistry:
    """MLflow's REST API (the requests its client sends), with the client's credentials.

    The model's files are read through the server's artifact proxy (`mlflow-artifacts:`
    locations, as `mlflow server` stores them by default and team mode sets up).
    """

    def __init__(self, server: str) -> None:
        self.server = server.rstrip("/")

    def _get(self, path: str, limit: int = MAX_ANSWER_BYTES,
             **query: str) -> tuple[int, bytes]:
        url = f"{self.server}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        request = urllib.request.Request(url, headers=store.auth_headers())
        try:
            with store.open_url(request, REQUEST_TIMEOUT) as answer:
                body = answer.read(limit + 1)
                status = answer.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(MAX_ANSWER_BYTES), exc.code
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"cannot read {url}: {getattr(exc, 'reason', exc)}") from None
        if len(body) > limit:
            raise RegistryError(f"{url}: more than the {limit} bytes allowed")
        return status, body

    def _json(self, endpoint: str, missing_ok: bool = False, **query: str) -> dict | None:
        status, body = self._get(f"api/2.0/mlflow/{endpoint}", **query)
        try:
            answer = json.loads(body or b"{}")
        except ValueError:
            answer = {}
        if status == 404 and missing_ok and answer.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            return None
        if status != 200:
            message = answer.get("message") if isinstance(answer, dict) else None
            raise RegistryError(f"{self.server} answered HTTP {status} to {endpoint}: "
                                f"{short(str(message or body[:400].decode(errors='replace')))}")
        if not isinstance(answer, dict):
            raise Unsupported(f"{endpoint}: unexpected answer")
        return answer

    def aliases(self, name: str) -> dict[str, str] | None:
        answer = self._json("registered-models/get", missing_ok=True, name=name)
        if answer is None:
            return None
        model = answer.get("registered_model", {})
        return {entry["alias"]: str(entry["version"]) for entry in model.get("aliases", [])}

    def versions(self, name: str) -> list[int]:
        found, token = [], None
        for _ in range(MAX_PAGES):
            query = {"filter": filter_string(name), "max_results": "1000"}
            if token:
                query["page_token"] = token
            answer = self._json("model-versions/search", **query) or {}
            found += [int(v["version"]) for v in answer.get("model_versions", [])]
            token = answer.get("next_page_token")
            if not token:
                return sorted(found)
        raise Unsupported(f"more than {MAX_PAGES} pages of versions of {name!r}")

    def version(self, name: str, version: str) -> VersionRecord | None:
        answer = self._json("model-versions/get", missing_ok=True, name=name, version=version)
        if answer is None:
            return None
        record = answer.get("model_version", {})
        location = (self._json("model-versions/get-download-uri", name=name,
                               version=version) or {}).get("artifact_uri", "")
        digest = next((tag.get("value") for tag in record.get("tags", [])
                       if isinstance(tag, dict) and tag.get("key") == INTEGRITY_TAG), None)
        return VersionRecord(name, str(version), record.get("run_id"),
                             self._proxied_reader(location), digest)

    def _proxied_reader(self, location: str) -> FileReader:
        parts = urllib.parse.urlsplit(location)
        own = urllib.parse.urlsplit(self.server).netloc
        if parts.scheme != "mlflow-artifacts" or parts.netloc not in ("", own):
            raise Unsupported(f"the model's files are at {location}")
        prefix = "api/2.0/mlflow-artifacts/artifacts/" + urllib.parse.quote(
            parts.path.strip("/"), safe="/%!$&'()*+,;=:@~")  # as requests (MLflow) quotes it

        def read(name: str, limit: int) -> bytes:
            status, body = self._get(f"{prefix}/{urllib.parse.quote(name)}", limit)
            if status != 200:
                raise RegistryError(f"{self.server} answered HTTP {status} for {name} of the "
                                    f"model at {location}")
            return body

        return read


# --- Any store, through MLflow's client -------------------------------------------------------


class ClientRegistry:
    """The same questions through MLflow's client: any store MLflow can read.

    Its versions carry no file reader: they are loaded by `model_loader.load_model_uri`.
    """

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()

    def aliases(self, name: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            registered = self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return {alias: str(version) for alias, version in (registered.aliases or {}).items()}

    def versions(self, name: str) -> list[int]:
        return sorted(int(v.version)
                      for v in self.client.search_model_versions(filter_string(name)))

    def version(self, name: str, version: str) -> VersionRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return VersionRecord(found.name, str(found.version), found.run_id, None,
                             (found.tags or {}).get(INTEGRITY_TAG))
