"""Team mode: a shared MLflow server on PostgreSQL, with S3 artifacts, basic auth and a DVC remote.

`python -m pipeline.commands.team` drives it; each part of the stack has a module here:

    clients (make train, dvc, predict) --HTTP, basic auth--> mlflow server --SQL--> PostgreSQL
                 |  dvc push/pull (S3 API)                        | artifacts (proxied)
                 +---------------------> SeaweedFS (S3) <---------+
    register stage --pg_advisory_lock--> PostgreSQL (database `registry_lock`)
    make tune (Optuna RDBStorage) -------> PostgreSQL (database `optuna`)

- `settings`: where the stack keeps its state, its ports and the secrets of its first `up`;
- `supervisor`: each server in its own process group, with a pid file, so `down` stops exactly
  what `up` started;
- `postgres`: the Debian server binaries, `initdb`, and one role per database (MLflow's, the
  register stage's lock, Optuna's studies), each reaching its own database only;
- `seaweedfs` (`weed mini`, the S3 store: bucket `mlflow` for artifacts, `dvc` for the remote;
  every other door closed by mutual TLS and JWT)
  and `mlflow_server` (`mlflow server --app-name basic-auth`, proxying the artifacts);
- `lifecycle`: up, down and status of the whole stack; `users`: team members, through MLflow's
  own auth client, each with its own S3 identity and database role (least privilege);
  `mlflow_auth`: the server's authorization function (READ members create nothing).

docs/security.md says which port checks what and who holds which key.

Everything lives in one git-ignored folder (`.team/` by default): the next `up` finds the runs,
the registry, the artifacts and the DVC objects where they were.
"""
