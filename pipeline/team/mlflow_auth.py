"""The MLflow server's authorization function: basic auth, and READ members create nothing.

MLflow 3.17's basic-auth lets any user who logs in create experiments, registered models,
prompts and gateway secrets and endpoints (`validate_can_create_experiment` only asks whether the
workspace allows creating, and without workspaces it always does); `default_permission` governs
existing resources only, and no setting of basic_auth.ini makes creation admin-only. Its
`authorization_function` is the hook it offers: this one runs MLflow's own basic auth, then
refuses a member without EDIT or MANAGE (`<state>/members.json`, made by `make team-user`) any
request that could change something, except the searches MLflow's client sends as POST. The
stack's admin, and EDIT and MANAGE members, go on to MLflow's per-resource permissions as before.
Loaded by the server process (`mlflow_server.start` names it in basic_auth.ini).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MEMBERS_ENV = "FMNIST_TEAM_MEMBERS_FILE"
ADMIN_ENV = "FMNIST_TEAM_ADMIN"
WRITERS = ("EDIT", "MANAGE")  # as settings.WRITERS; the server process imports no more
_READ_METHODS = ("GET", "HEAD", "OPTIONS")
_cache: dict[str, object] = {"mtime": None, "writers": frozenset()}


def _writers() -> frozenset[str]:
    """Members with EDIT or MANAGE, re-read when `make team-user` rewrites the file."""
    path = Path(os.environ.get(MEMBERS_ENV, ""))
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return frozenset()
    if mtime != _cache["mtime"]:
        members = json.loads(path.read_text())
        _cache.update(mtime=mtime, writers=frozenset(
            name for name, member in members.items() if member.get("permission") in WRITERS))
    return _cache["writers"]  # type: ignore[return-value]


def _is_search(path: str) -> bool:
    """MLflow's client sends its searches as POST (runs/search, logged-models/search, ...)."""
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return "search" in last


def authenticate():
    from flask import Response, request
    from mlflow.server.auth import authenticate_request_basic_auth

    result = authenticate_request_basic_auth()
    if isinstance(result, Response):
        return result
    user = result.username
    if (request.method in _READ_METHODS or _is_search(request.path)
            or user == os.environ.get(ADMIN_ENV) or user in _writers()):
        return result
    body = {"error_code": "PERMISSION_DENIED",
            "message": f"user {user!r} has READ permission: it may not create or change "
                       "anything on this server (team mode refuses creation to READ members)"}
    return Response(json.dumps(body), status=403, mimetype="application/json")
