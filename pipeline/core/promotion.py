"""The promotion rule: when does a new model replace the champion?

Kept apart from MLflow so the rule can be read, tested and changed in one place. With a test
(`decide_paired`) the gain must be at least `min_improvement` and significant at `alpha` on the
same test images (`pipeline.core.paired_tests`); without one (`decide`, `test: none`) any gain
of more than `min_improvement` promotes, as the pipeline did before the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.paired_tests import BootstrapInterval, McNemar


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    # What the test found, for the run description, the summary and the ledger: test, n01,
    # n10, p_value or ci_low, ci_high, level; and alpha. Empty without a test.
    statistics: dict[str, Any] = field(default_factory=dict)


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


def describe_evidence(evidence: McNemar | BootstrapInterval, alpha: float) -> str:
    """The test's numbers in a few words, e.g. `McNemar n01=12 n10=11 p=1.0000`."""
    if isinstance(evidence, McNemar):
        return f"McNemar n01={evidence.n01} n10={evidence.n10} p={evidence.p_value:.4g}"
    return (f"bootstrap {evidence.level:.0%} CI of the gain [{evidence.low:+.4f}, "
            f"{evidence.high:+.4f}] ({evidence.samples} resamples)")


def evidence_statistics(evidence: McNemar | BootstrapInterval, alpha: float) -> dict[str, Any]:
    if isinstance(evidence, McNemar):
        return {"test": "mcnemar", "n01": evidence.n01, "n10": evidence.n10,
                "p_value": evidence.p_value, "alpha": alpha}
    return {"test": "bootstrap", "ci_low": evidence.low, "ci_high": evidence.high,
            "level": evidence.level, "samples": evidence.samples, "alpha": alpha}


def decide_paired(
    candidate: float,
    champion: float,
    metric: str,
    evidence: McNemar | BootstrapInterval,
    greater_is_better: bool = True,
    min_improvement: float = 0.0,
    alpha: float = 0.05,
) -> Decision:
    """Promote only a gain of at least `min_improvement` that is significant at `alpha`:
    McNemar's p-value below alpha with more images won than lost, or a bootstrap interval
    entirely above zero."""
    statistics = evidence_statistics(evidence, alpha)
    if not math.isfinite(candidate):
        return Decision(False, f"{metric}={candidate} is not a finite number", statistics)
    gain = candidate - champion if greater_is_better else champion - candidate
    if isinstance(evidence, McNemar):
        significant = evidence.p_value < alpha and evidence.n01 > evidence.n10
    else:
        significant = evidence.low > 0
    numbers = describe_evidence(evidence, alpha)
    versus = f"{metric} {candidate:.4f} vs champion {champion:.4f}"
    if gain <= 0:
        why = "ties" if gain == 0 else "is worse than"
        return Decision(False, f"{metric} {candidate:.4f} {why} champion {champion:.4f} "
                               f"({numbers})", statistics)
    if gain < min_improvement:
        return Decision(False, f"{versus}: gain {gain:+.4f} is below min_improvement "
                               f"{min_improvement} ({numbers})", statistics)
    if not significant:
        return Decision(False, f"{versus}: gain {gain:+.4f} is not significant at alpha "
                               f"{alpha} ({numbers})", statistics)
    return Decision(True, f"{metric} {candidate:.4f} beats champion {champion:.4f} by "
                          f"{gain:+.4f}, significant at alpha {alpha} ({numbers})", statistics)


def statistics_line(statistics: dict[str, Any]) -> str:
    """A Decision's statistics in one line, for the summary table and the ledger's history."""
    test = statistics.get("test")
    if "champion_test_digest" in statistics:
        return (f"{test}: not run, test sets differ (champion "
                f"{statistics['champion_test_digest'][:16]}, candidate "
                f"{statistics['candidate_test_digest'][:16]})")
    if test == "mcnemar" and "p_value" in statistics:
        return (f"McNemar n01={statistics['n01']} n10={statistics['n10']} "
                f"p={statistics['p_value']:.4g} (alpha {statistics['alpha']})")
    if test == "bootstrap" and "ci_low" in statistics:
        return (f"bootstrap {statistics['level']:.0%} CI of the gain [{statistics['ci_low']:+.4f}, "
                f"{statistics['ci_high']:+.4f}] ({statistics['samples']} resamples)")
    return "none (raw difference)" if test == "none" else "-"
