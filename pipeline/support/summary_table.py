"""The table printed at the end of a run: what was trained, how it scored, who is champion.

Reads only the files the stages wrote, so it works after a `dvc repro` that skipped every stage;
the caller checks first that the current store holds the run and version they name
(`store_records`), and passes where the champion alias points now.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.promotion import statistics_line
from pipeline.support.outputs import Outputs


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _version_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "none"
    value = entry.get("value")
    return f"version {entry['version']}" + (f" ({value:.4f})" if value is not None else "")


def format_run_summary(out: Outputs | None = None, champion_now: str | None = None) -> str:
    """`champion_now`: the champion's version in the store now, when the caller read it."""
    out = out or Outputs()
    run = _read(out.run) or {}
    trained = _read(out.train_metrics) or {}
    evaluated = _read(out.evaluate_metrics) or {}
    registration = _read(out.registration)
    name, run_id = run.get("run_name", "?"), run.get("run_id", "?")
    rows: list[tuple[str, str]] = [("run", f"{name} ({run_id})")]
    if trained:
        # the wall time is in the run record (models/run.json), not in the committed metrics
        seconds = run.get("train_seconds", trained.get("train_seconds"))
        took = f"{seconds:.1f} s, " if seconds is not None else ""
        rows.append(("training", f"{took}{trained['epochs_run']} epochs "
                                 f"(best {trained['best_epoch']})"))
    for key in ("accuracy", "f1_macro", "log_loss"):
        values = [f"{split} {evaluated[split][key]:.4f}" for split in ("val", "test")
                  if key in evaluated.get(split, {})]
        if values:
            rows.append((key, "   ".join(values)))
    if registration:
        rows.append(("champion before", _version_cell(registration["champion_before"])))
        rows.append(("champion after", _version_cell(registration["champion_after"])))
        if registration.get("statistics"):
            rows.append(("promotion gate", statistics_line(registration["statistics"])))
        verdict = "promoted" if registration["promoted"] else "not promoted"
        rows.append(("this model", f"version {registration['candidate']['version']}, {verdict}: "
                                   f"{registration['reason']}"))
        if registration.get("same_bytes_as") is not None:
            rows.append(("model bytes", f"already registered as version "
                                        f"{registration['same_bytes_as']}: no new version"))
        after = (registration["champion_after"] or {}).get("version")
        if champion_now is not None and champion_now != str(after):
            rows.append(("champion now", f"version {champion_now} (moved since this run)"))
    width = max(len(label) for label, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    lines = [rule, *(f"{label:<{width}}  {value}" for label, value in rows), rule]
    return "\n".join(lines)

