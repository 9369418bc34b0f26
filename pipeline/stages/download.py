"""Stage `download`: fetch the four Fashion-MNIST archives into `data.raw_dir`, verified by MD5.

Usage: python -m pipeline.stages.download [--params params.yaml]

Mirrors are tried in the order of `data.mirrors`; the environment variable FMNIST_MIRROR (a
directory, a file:// URL or an http(s):// URL) goes in front of them, which is how offline
machines and tests point the stage at a local copy; unset, a `../shared/fashion-mnist` folder of
archives beside the checkout plays that part (`pipeline.support.workspace.mirror_source`). A
mirror is a base: the file's URL is the mirror, a slash and the file name.

Only a file whose MD5 matches the configuration ever appears under its final name: each transfer
goes to a temporary file in the same directory and is renamed once verified, so an interrupted
or corrupted transfer leaves nothing behind. A file already present with the right MD5 is kept.

Retries: each mirror gets `download.retries` attempts, `download.backoff` seconds apart, doubling
each time, for transient failures (time-outs, dropped connections, short or corrupted transfers,
HTTP 5xx/408/429). A 4xx answer or a missing local file moves on to the next mirror at once:
asking again would give the same answer. Every file is attempted; the stage then fails with one
message per missing file naming each mirror tried and why it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from tqdm import tqdm

from pipeline.core.errors import PipelineError
from pipeline.core.files import atomic_write, is_temp_file_of, md5sum
from pipeline.support import config, errors
from pipeline.support.workspace import MIRROR_ENV, mirror_source

CHUNK_SIZE = 1 << 16
USER_AGENT = "fashion-mnist-pipeline (Python urllib)"
_URL_SCHEMES = ("http", "https", "file")


class FetchError(PipelineError):
    """One attempt at one source failed; `permanent` when retrying cannot help."""

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@dataclass
class DownloadFailure:
    """A file that no mirror could deliver, with each source tried and why it failed."""

    name: str
    md5: str
    attempts: list[tuple[str, str]]

    def __str__(self) -> str:
        lines = [f"{self.name} (expected MD5 {self.md5}):"]
        lines += [f"  - {source}: {reason}" for source, reason in self.attempts]
        if not self.attempts:
            lines.append("  - no mirrors configured (data.mirrors is empty, FMNIST_MIRROR unset)")
        return "\n".join(lines)


def _is_url(mirror: str) -> bool:
    return urlsplit(mirror).scheme.lower() in _URL_SCHEMES


def normalise_mirror(mirror: str) -> str:
    """URLs stay as they are; anything else is a directory, made absolute."""
    if _is_url(mirror):
        return mirror
    scheme = urlsplit(mirror).scheme
    if len(scheme) > 1:  # some other URL scheme; reported as unsupported when tried
        return mirror
    return str(Path(mirror).expanduser().absolute())


def mirrors_to_try(configured: Sequence[str], env: str | None = None) -> list[str]:
    """`env` (normally $FMNIST_MIRROR) first, then the configured mirrors, without repeats."""
    candidates = ([env] if env else []) + list(configured)
    mirrors: list[str] = []
    for mirror in map(normalise_mirror, candidates):
        if mirror not in mirrors:
            mirrors.append(mirror)
    return mirrors


def source_for(mirror: str, name: str) -> str:
    """The location of `name` on `mirror`, whether or not the mirror ends with a slash."""
    if _is_url(mirror) or len(urlsplit(mirror).scheme) > 1:
        return f"{mirror.rstrip('/')}/{name}"
    return os.path.join(mirror, name)


def _describe_size(received: int, length: int | None) -> str:
    return f"{received:,} of {length:,} bytes" if length is not None else f"{received:,} bytes"


def _open_local(path: str) -> tuple[BinaryIO, int]:
    try:
        stream = open(path, "rb")  # noqa: SIM115 - closed by the caller's `with`
    except FileNotFoundError:
        raise FetchError("missing local file", permanent=True) from None
    except OSError as exc:
        raise FetchError(f"cannot read local file: {exc.strerror}", permanent=True) from None
    return stream, os.fstat(stream.fileno()).st_size


def _open_http(url: str, timeout: float) -> tuple[BinaryIO, int | None]:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        transient = exc.code >= 500 or exc.code in (408, 429)
        raise FetchError(f"HTTP {exc.code} {exc.reason}", permanent=not transient) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise FetchError(f"timed out after {timeout:g} s while connecting") from None
        raise FetchError(f"cannot connect: {exc.reason}") from None
    except TimeoutError:
        raise FetchError(f"timed out after {timeout:g} s waiting for a response") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"connection failed: {exc!r}") from None
    length = response.headers.get("Content-Length")
    try:
        return response, int(length) if length is not None else None
    except ValueError:
        return response, None


def _open(source: str, timeout: float) -> tuple[BinaryIO, int | None]:
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return _open_http(source, timeout)
    if scheme == "file":
        return _open_local(urllib.request.url2pathname(parts.path))
    if len(scheme) > 1:
        raise FetchError(f"unsupported URL scheme {parts.scheme!r}", permanent=True)
    return _open_local(source)


def fetch(source: str, dest: Path, md5: str, timeout: float, progress: bool = True) -> int:
    """Copy `source` to `dest` if and only if its MD5 is `md5`; return the number of bytes.

    Raises FetchError (and leaves `dest` and its directory untouched) on any failure of the
    source. Errors writing `dest` (a full disk) are not the source's fault and propagate.
    """
    stream, length = _open(source, timeout)
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    bar = tqdm(
        total=length, desc=dest.name, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, leave=False, disable=None if progress else True,
    )
    with stream, bar, atomic_write(dest) as out:
        while True:
            try:
                chunk = stream.read(CHUNK_SIZE)
            except TimeoutError:
                raise FetchError(
                    f"timed out after {timeout:g} s without data "
                    f"({_describe_size(received, length)} received)"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise FetchError(
                    f"connection broken after {_describe_size(received, length)}: {exc!r}"
                ) from None
            if not chunk:
                break
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        if length is not None and received != length:
            raise FetchError(
                f"connection closed early: received {_describe_size(received, length)}"
            )
        actual = digest.hexdigest()
        if actual != md5:
            raise FetchError(f"MD5 mismatch: expected {md5}, got {actual} ({received:,} bytes)")
    return received


def fetch_from_mirrors(
    name: str, md5: str, dest: Path, mirrors: Sequence[str], settings: config.DownloadConfig,
    log: Callable[[str], None] = print, sleep: Callable[[float], None] | None = None,
) -> tuple[str, int] | DownloadFailure:
    """Try each mirror in turn with retries; the source and size, or why every mirror failed."""
    attempts: list[tuple[str, str]] = []
    for number, mirror in enumerate(mirrors, start=1):
        source = source_for(mirror, name)
        delay = settings.backoff
        for attempt in range(1, settings.retries + 1):
            try:
                return source, fetch(source, dest, md5, settings.timeout)
            except FetchError as exc:
                error = exc
            if error.permanent or attempt == settings.retries:
                break
            log(f"{name}: attempt {attempt}/{settings.retries} from {source} failed: "
                f"{error.reason}; retrying in {delay:g} s")
            (sleep or time.sleep)(delay)
            delay *= 2
        tries = f" ({attempt} attempts)" if attempt > 1 else ""
        attempts.append((source, error.reason + tries))
        if number < len(mirrors):
            log(f"{name}: {source} failed: {error.reason}{tries}; trying the next mirror")
    return DownloadFailure(name, md5, attempts)


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last)."""
    missing = []
    for candidate in [directory, *directory.parents]:
        if candidate.exists():
            break
        missing.append(candidate)
    directory.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def download(
    data: config.DataConfig, mirrors: Sequence[str], log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> list[DownloadFailure]:
    """Make `data.raw_dir` hold the four verified archives; return the files that failed."""
    raw_dir = Path(data.raw_dir)
    created = _make_dirs(raw_dir)
    names = [spec.name for spec in data.files.values()]
    failures: list[DownloadFailure] = []
    try:
        # Left-overs of a killed run (SIGKILL, power loss): never valid, never to be tracked.
        for leftover in raw_dir.iterdir():
            if any(is_temp_file_of(leftover, name) for name in names):
                leftover.unlink(missing_ok=True)
        for key in config.FILE_KEYS:
            spec = data.files[key]
            dest = raw_dir / spec.name
            if dest.is_file():
                actual = md5sum(dest)
                if actual == spec.md5:
                    log(f"{spec.name}: already present with the right MD5, not fetched again")
                    continue
                warn(f"{spec.name}: present but its MD5 is {actual}, expected {spec.md5}; "
                     "removing it and fetching it again")
                dest.unlink()
            outcome = fetch_from_mirrors(spec.name, spec.md5, dest, mirrors, data.download,
                                         log=warn)
            if isinstance(outcome, DownloadFailure):
                failures.append(outcome)
            else:
                source, size = outcome
                log(f"{spec.name}: fetched {size:,} bytes from {source}, MD5 OK")
    finally:
        for directory in reversed(created):  # only the ones this run made, and only if empty
            with contextlib.suppress(OSError):
                directory.rmdir()
    return failures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.stages.download",
        description="Fetch the Fashion-MNIST archives into data.raw_dir, verified by MD5.",
        epilog=f"{MIRROR_ENV}: a directory, file:// or http(s):// URL tried before the mirrors "
               "(default: ../shared/fashion-mnist beside the checkout, if it has archives).",
    )
    parser.add_argument("--params", default=config.PARAMS_FILE, help="composed parameter file")
    args = parser.parse_args(argv)

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        data = config.load(args.params).data
        mirrors = mirrors_to_try(data.mirrors, mirror_source())
        failures = download(data, mirrors, warn=warn)
    except (config.ConfigError, OSError) as exc:  # OSError: a full disk, no permission
        errors.show_traceback(exc)
        warn(f"download: error: {exc}")
        return 1
    except KeyboardInterrupt:
        warn("download: interrupted; verified files are kept, partial ones removed")
        return 130
    if failures:
        warn(f"download: error: could not fetch {len(failures)} of {len(data.files)} files "
             f"into {data.raw_dir}:")
        for failure in failures:
            warn(str(failure))
        return 1
    print(f"download: {len(data.files)} files verified in {data.raw_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
