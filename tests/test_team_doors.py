"""No door of the team stack opens without a key: every port it listens on, tried anonymously.

The ports are found from the processes themselves (the stack's process groups and PostgreSQL's
postmaster), not from the settings, so a component that opens a port of its own is tried too.
On each: an anonymous list, read, write and delete, over HTTP, S3 and gRPC. Success is judged
by effect, not only by status code: the object read is never served, the object listed is
never named, the object written never appears and the object deleted stays.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.team import seaweedfs
from pipeline.team.settings import DVC_BUCKET, S3_CLIENT_ENV
from tests.repo_copy import BIN
from tests.team_stack import Team

pytestmark = pytest.mark.slow
SECRET = b"fmnist-doors-secret-content-0123456789"
KEY = "doors/victim.bin"


def _group_pids(group: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == group:  # pgrp
                found.add(int(entry.name))
    return found


def listening_ports(team: Team) -> dict[int, str]:
    """Every TCP port a process of the stack listens on, with the process's name."""
    pids: dict[int, str] = {}
    for pid_file in (team.state / "run").glob("*.pid"):
        for pid in _group_pids(int(pid_file.read_text())):
            pids[pid] = pid_file.stem
    postmaster = team.state / "postgres" / "data" / "postmaster.pid"
    pids[int(postmaster.read_text().split()[0])] = "postgres"
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True)
    ports = {}
    for line in listening.stdout.splitlines():
        port = int(line.split()[3].rsplit(":", 1)[1])
        for pid, name in pids.items():
            if f"pid={pid}," in line:
                ports[port] = name
    return ports


def _http(method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:  # not HTTP at all (gRPC, PostgreSQL)
        return 0, str(exc).encode()


def _admin_s3(team: Team):
    import boto3

    os.environ.update(S3_CLIENT_ENV)
    env = team.env
    return boto3.client("s3", endpoint_url=env["DVC_REMOTE_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def _speaks_plain_http2(port: int) -> bool:
    """A plaintext gRPC server answers the HTTP/2 preface with a SETTINGS frame."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        try:
            head = sock.recv(9)
        except OSError:
            return False
    return len(head) == 9 and head[3] == 4  # frame type 4: SETTINGS


def _tls_without_certificate_is_served(port: int) -> bool:
    """A TLS client without the stack's certificate: mutual TLS must refuse it."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw) as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            return len(tls.recv(9)) == 9
    except (ssl.SSLError, OSError):
        return False


def _weed_as(cwd: Path, home: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "weed"), *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "HOME": str(home)})


def test_no_port_of_the_stack_lists_reads_writes_or_deletes_without_a_key(
        team: Team, tmp_path: Path) -> None:
    stack = team.stack
    ports = listening_ports(team)
    assert set(ports) <= set(stack.ports.values()), f"ports outside the stack's block: {ports}"
    assert {stack.ports[name] for name in ("postgres", "mlflow", "s3", "master", "volume",
                                           "filer")} <= set(ports)
    s3 = _admin_s3(team)
    s3.put_object(Bucket=DVC_BUCKET, Key=KEY, Body=SECRET)
    # A file id of the volume server, made with the stack's own certificate (a real fid).
    (tmp_path / "fid.bin").write_bytes(SECRET)
    uploaded = _weed_as(seaweedfs.config_dir(stack), tmp_path, "upload",
                        f"-master=127.0.0.1:{stack.ports['master']}.{stack.ports['master_grpc']}",
                        str(tmp_path / "fid.bin"))
    assert uploaded.returncode == 0, uploaded.stderr
    fid = uploaded.stdout.split('"fid":"')[1].split('"')[0]

    attempts = []
    for port in sorted(ports):
        base = f"http://127.0.0.1:{port}"
        for method, path, body in (
                ("GET", f"/buckets/{DVC_BUCKET}/doors/", None),              # filer list
                ("GET", f"/{DVC_BUCKET}?list-type=2", None),                 # S3 list
                ("GET", "/dir/status", None),                                # master topology
                ("GET", "/api/2.0/mlflow/experiments/search?max_results=5", None),
                ("GET", f"/buckets/{DVC_BUCKET}/{KEY}", None),               # filer read
                ("GET", f"/{DVC_BUCKET}/{KEY}", None),                       # S3 read
                ("GET", f"/{fid}", None),                                    # volume read
                ("GET", f"/api/2.0/mlflow-artifacts/artifacts/{KEY}", None),
                ("POST", f"/buckets/{DVC_BUCKET}/doors/new.bin", b"intruder"),
                ("PUT", f"/{DVC_BUCKET}/doors/new.bin", b"intruder"),
                ("POST", "/dir/assign", b""),                                # master: a fid
                ("POST", f"/{fid}", b"intruder"),                             # volume write
                ("PUT", "/api/2.0/mlflow-artifacts/artifacts/doors/new.bin", b"intruder"),
                ("DELETE", f"/buckets/{DVC_BUCKET}/{KEY}", None),
                ("DELETE", f"/{DVC_BUCKET}/{KEY}", None),
                ("DELETE", f"/{fid}", None),
                ("DELETE", f"/api/2.0/mlflow-artifacts/artifacts/{KEY}", None)):
            status, answer = _http(method, base + path, body,
                                   {"Accept": "application/json"})
            attempts.append((port, ports[port], method, path, status))
            assert SECRET not in answer, (port, method, path)
            if "victim" not in path:  # an error may echo the path it was asked
                assert b"victim.bin" not in answer, (port, method, path)
            assert not 200 <= status < 300, (port, ports[port], method, path, status)
            if method == "POST" and path == "/dir/assign":
                assert b'"fid"' not in answer, port
        assert not _speaks_plain_http2(port), f"port {port} serves gRPC without TLS"
        assert not _tls_without_certificate_is_served(port), f"port {port}: TLS without cert"
    assert len(attempts) == 17 * len(ports)

    # gRPC with SeaweedFS's own client, from a folder without the stack's certificate.
    anonymous = tmp_path / "anonymous"
    anonymous.mkdir()
    master = f"-master=127.0.0.1:{stack.ports['master']}.{stack.ports['master_grpc']}"
    refused = _weed_as(anonymous, anonymous, "upload", master, str(tmp_path / "fid.bin"))
    assert refused.returncode != 0 and '"fid"' not in refused.stdout, refused.stdout
    filer = f"127.0.0.1:{stack.ports['filer']}.{stack.ports['filer_grpc']}"
    read = _weed_as(anonymous, anonymous, "filer.cat",
                    f"http://{filer}/buckets/{DVC_BUCKET}/{KEY}")
    assert read.returncode != 0 and SECRET.decode() not in read.stdout

    # PostgreSQL: no role without its password.
    import psycopg

    for user in ("postgres", "mlflow", "fmnist_lock", "fmnist_optuna"):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(host="127.0.0.1", port=stack.ports["postgres"], user=user,
                            dbname="postgres", password="", connect_timeout=5).close()

    # MLflow: only /health answers without credentials.
    assert _http("GET", f"http://127.0.0.1:{stack.ports['mlflow']}/health")[0] == 200
    # Nothing was written, nothing deleted.
    assert s3.get_object(Bucket=DVC_BUCKET, Key=KEY)["Body"].read() == SECRET
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=DVC_BUCKET, Prefix="doors/")["Contents"]]
    assert keys == [KEY]
    got = _weed_as(seaweedfs.config_dir(stack), tmp_path, "download",
                   f"-master=127.0.0.1:{stack.ports['master']}.{stack.ports['master_grpc']}",
                   f"-dir={tmp_path}", fid)
    assert got.returncode == 0, got.stderr
    s3.delete_object(Bucket=DVC_BUCKET, Key=KEY)
