"""Users and permissions go through MLflow's own auth client, never hand-written REST paths.

`mlflow.server.get_app_client("basic-auth")` knows the endpoints of the installed MLflow; a path
copied into the project would silently break when MLflow moves one (permissions already moved
from /api/2.0 to /api/3.0 once).
"""

from __future__ import annotations

import pytest

from tests.synthetic import REPO_ROOT

PACKAGE = REPO_ROOT / "pipeline"
AUTH_ENDPOINTS = ("/api/2.0/mlflow/users", "/api/3.0/mlflow/users", "/mlflow/users/",
                  "permissions/grant", "permissions/revoke", "update-password",
                  "experiment-permissions", "registered-model-permissions")
MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_scanned() -> None:
    assert PACKAGE / "team" / "users.py" in MODULES


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_module_holds_a_hand_written_auth_endpoint(module) -> None:
    text = module.read_text()
    found = [endpoint for endpoint in AUTH_ENDPOINTS if endpoint in text]
    assert not found, f"{module.relative_to(REPO_ROOT)}: use MLflow's auth client, not {found}"


def test_members_are_added_through_mlflow_s_auth_client() -> None:
    assert 'get_app_client("basic-auth"' in (PACKAGE / "team" / "users.py").read_text()
