"""A registered version's identity: the SHA-256 of its model file, recorded at registration.

The register stage sets the tag `model_sha256` on each version; a store that runs MLflow's auth
lets only EDIT users change it. `model_loader` checks the bytes it is about to load against it,
from whatever store they come from, so a model file replaced in the artifact store is refused.

What is hashed is the skops archive in its reproducible form (`model_files.reproducible_skops`:
object ids renumbered, entries sorted, no timestamps). skops stamps the archive MLflow logs with
the clock and memory addresses, so two runs of the same training log different bytes; their
reproducible form is one and the same, and equals `models/model.skops` as the train stage writes
it (what `dvc.lock` records and the evaluate stage scored). Hence one digest identifies a model
across runs (a byte-identical model is not registered twice) and ties the served model to the
evaluated one. Two archives with the same reproducible form rebuild the same model.

Versions registered before this tag existed have none: they are loaded with a one-line notice
on stderr that names the digest found (see `unverified_notice`).
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.support.model_files import reproducible_skops

TAG = "model_sha256"


def model_digest(data: bytes) -> str:
    """SHA-256 of a skops archive in its reproducible form; of the raw bytes if it is not one
    (never equal to a recorded digest, so such a file is refused with both hashes)."""
    try:
        canonical = reproducible_skops(data)
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError):
        canonical = data
    return hashlib.sha256(canonical).hexdigest()


def mismatch_message(what: str, expected: str, actual: str) -> str:
    """The one line a refused model gets: which version, and both hashes."""
    return (f"{what}: the model file's SHA-256 is {actual}, but the registry recorded "
            f"{expected} ({TAG}) when it was registered: the file was replaced or damaged; "
            "refused")


def unverified_notice(what: str, actual: str) -> str:
    return (f"note: {what} has no {TAG} tag (registered before model digests were recorded): "
            f"its bytes cannot be verified (SHA-256 {actual}); loaded anyway")


def identity_tags(digest: str) -> dict[str, str]:
    return {TAG: digest}


def version_holding(client: Any, name: str, digest: str) -> Any | None:
    """The oldest version of `name` whose model has this digest, or None."""
    from pipeline.support.registry_reader import filter_string

    found = client.search_model_versions(f"{filter_string(name)} and tags.{TAG} = '{digest}'")
    return min(found, key=lambda version: int(version.version), default=None)


class ModelIdentityError(PipelineError, ValueError):
    """The logged model is not the model file the evaluate stage scored."""


def check_evaluated(model_file: Path, digest: str) -> None:
    """Refuse to register a logged model whose digest differs from the local model file's (the
    train stage writes both from one estimator; the evaluate stage scored the file)."""
    if not model_file.is_file():
        return  # nothing was scored from a file here (a run registered by other means)
    local = model_digest(model_file.read_bytes())
    if local != digest:
        raise ModelIdentityError(
            f"the logged model's SHA-256 is {digest}, but {model_file}, which the evaluate stage "
            f"scored, has {local}: not registered; rerun `dvc repro -f -s train && dvc repro`")
