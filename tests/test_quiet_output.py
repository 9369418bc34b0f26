"""What a user reads in the terminal: no noise from the libraries under the pipeline (issue 19)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.synthetic import REPO_ROOT
from tests.test_serve import _free_port, _stop
from tests.test_ui import _wait_for


@pytest.mark.slow
def test_runs_against_a_server_print_no_view_run_lines(tmp_path: Path) -> None:
    """MLflow prints two emoji lines per run to a tracking server (every stage, every trial)."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", server)
        code = ("from pipeline.support import store\n"
                "store.quiet_mlflow()\n"
                "import mlflow\n"
                f"mlflow.set_tracking_uri('http://127.0.0.1:{port}')\n"
                "with mlflow.start_run(run_name='quiet'):\n"
                "    mlflow.log_metric('m', 1.0)\n"
                "print('done')\n")
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, text=True,
                                capture_output=True, timeout=120)
    finally:
        _stop(server)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert "View run" not in result.stderr and "View experiment" not in result.stderr
