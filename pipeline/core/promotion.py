"""The promotion rule: when does a new model replace the champion?

Kept apart from MLflow so the rule can be read, tested and changed in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(
    candidate: float,
    champion: float | None,
    metric: str,
    greater_is_better: bool = True,
    min_improvement: float = 0.0,
) -> Decision:
    """Promote only an improvement of more than `min_improvement`; a tie keeps the champion."""
    if not math.isfinite(candidate):
        return Decision(False, f"{metric}={candidate} is not a finite number")
    if champion is None:
        return Decision(True, f"no champion yet; {metric}={candidate:.4f}")
    gain = candidate - champion if greater_is_better else champion - candidate
    if gain > min_improvement:
        return Decision(
            True, f"{metric} {candidate:.4f} beats champion {champion:.4f} by {gain:+.4f}"
        )
    if gain == 0:
        why = "ties"
    elif gain < 0:
        why = "is worse than"
    else:
        why = f"improves by {gain:+.4f}, not more than min_improvement {min_improvement} over"
    return Decision(False, f"{metric} {candidate:.4f} {why} champion {champion:.4f}")
