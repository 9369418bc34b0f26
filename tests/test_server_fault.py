"""A tracking server lost mid-command is the one line every command prints for a server down.

MLflow's client, after its retries, raises an MlflowException holding urllib3's "Max retries
exceeded ... Connection refused"; `errors.explain` (used by every stage, `make tune` and
`make retrain`) turns it into the "cannot reach the MLflow tracking server" line. Real client,
real refused connection (a port nothing listens on).
"""

from __future__ import annotations

import socket

import pytest


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_request_to_a_vanished_server_is_explained_as_unreachable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.support import errors, store

    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store.quiet_mlflow()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with pytest.raises(MlflowException) as raised:
        MlflowClient(tracking_uri=uri).get_run("0" * 32)
    assert isinstance(raised.value, errors.expected())
    line = errors.explain(raised.value)
    assert line.startswith(f"cannot reach the MLflow tracking server {uri} (connection refused)")
    assert "make team-up" in line and "Max retries" not in line
    assert "\n" not in line


def test_other_mlflow_errors_keep_their_own_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.support import errors, store

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    store.quiet_mlflow()
    from mlflow.exceptions import MlflowException

    line = errors.explain(MlflowException("Run 'abc' not found"))
    assert line == "MlflowException: Run 'abc' not found"
