"""The record the register stage writes (models/registration.json) and its one-line summary.

Shared by the register stage, which prints the line, and the retrain job, which reads the file
after `dvc repro`; it imports neither, so neither drags the other's dependencies in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.promotion import statistics_line


class RegistrationFileError(PipelineError, ValueError):
    """models/registration.json does not fit the schema; the message says which part."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    value: float


@dataclass(frozen=True)
class Registration:
    """models/registration.json, as the register stage writes it."""

    metric: str
    candidate: ModelVersion | None
    champion_before: ModelVersion | None
    champion_after: ModelVersion | None
    promoted: bool
    reason: str
    same_bytes_as: str | None = None  # the version that already held the run's model bytes
    statistics: dict[str, Any] = field(default_factory=dict)  # the promotion gate's numbers


def _model_version(raw: Any, key: str) -> ModelVersion | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "version" not in raw or "value" not in raw:
        raise RegistrationFileError(f"{key} must be null or an object with 'version' and 'value'")
    value = raw["value"]
    return ModelVersion(str(raw["version"]), float("nan") if value is None else float(value))


def parse_registration(text: str | bytes) -> Registration:
    """Registration from the file's text; RegistrationFileError says what does not fit."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistrationFileError(f"not valid JSON: {exc}") from None
    return registration_from_record(raw)


def registration_from_record(raw: Any) -> Registration:
    """Registration from the record the register stage writes (so it can format its own line)."""
    if not isinstance(raw, dict):
        raise RegistrationFileError("expected a JSON object")
    missing = [key for key in ("metric", "candidate", "champion_after", "promoted")
               if key not in raw]
    if missing:
        raise RegistrationFileError(f"missing keys: {', '.join(missing)}")
    return Registration(
        metric=str(raw["metric"]),
        candidate=_model_version(raw["candidate"], "candidate"),
        champion_before=_model_version(raw.get("champion_before"), "champion_before"),
        champion_after=_model_version(raw["champion_after"], "champion_after"),
        promoted=bool(raw["promoted"]),
        reason=str(raw.get("reason", "")),
        same_bytes_as=None if raw.get("same_bytes_as") is None else str(raw["same_bytes_as"]),
        statistics=_statistics(raw.get("statistics")),
    )


def _statistics(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RegistrationFileError("statistics must be null or an object")
    return raw


@dataclass(frozen=True)
class Outcome:
    kind: str  # "promoted", "kept" or "unchanged"
    line: str

    def __str__(self) -> str:
        return self.line


def _value(value: float) -> str:
    return f"{value:.4f}"


def describe(registration: Registration, changed: bool) -> Outcome:
    """The one line a cycle ends with; `changed`: this cycle wrote the registration."""
    outcome = _describe(registration, changed)
    line = outcome.line
    if changed and registration.candidate is not None:
        # Why: the test's numbers, where the gate ran one (not for a raw comparison).
        gate = statistics_line(registration.statistics)
        if gate not in ("-", "none (raw difference)"):
            line = f"{line}; gate: {gate}"
    if changed and registration.same_bytes_as is not None:
        line = (f"{line}; no new version: version {registration.same_bytes_as} already holds "
                "these model bytes")
    return Outcome(outcome.kind, line)


def _describe(registration: Registration, changed: bool) -> Outcome:
    metric = registration.metric
    champion, candidate = registration.champion_after, registration.candidate
    if not changed:
        if champion is None:
            return Outcome("unchanged", "nothing changed (no champion yet)")
        return Outcome("unchanged", f"nothing changed (champion version {champion.version}, "
                                    f"{metric} {_value(champion.value)})")
    if candidate is None:
        raise RegistrationFileError("a new registration without a candidate")
    before = registration.champion_before
    if registration.promoted and before is not None and before.version == candidate.version:
        # The register stage ran again for the run that is already the champion.
        return Outcome("kept", f"kept champion version {candidate.version} ({metric} "
                               f"{_value(candidate.value)}; the candidate is that same version)")
    if registration.promoted:
        if before is None:
            detail = f"{metric} {_value(candidate.value)}; no previous champion"
        else:
            # "<" when lower is better (a loss as the promotion metric); "vs" for a NaN
            sign = (">" if candidate.value > before.value
                    else "<" if candidate.value < before.value
                    else "=" if candidate.value == before.value else "vs")
            detail = (f"{metric} {_value(candidate.value)} {sign} champion version "
                      f"{before.version} {_value(before.value)}")
        return Outcome("promoted", f"promoted version {candidate.version} ({detail})")
    if champion is None:
        return Outcome("kept", f"no champion: candidate version {candidate.version} not promoted "
                               f"({registration.reason or metric + ' ' + _value(candidate.value)})")
    return Outcome("kept", f"kept champion version {champion.version} ({metric} "
                           f"{_value(champion.value)}; candidate version {candidate.version} "
                           f"{_value(candidate.value)})")
