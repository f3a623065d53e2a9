"""Which layer groups to keep in high precision: rank by sensitivity, then keep the worst until the budget holds.

Each candidate group is quantised alone (everything else fp32) and scored by teacher-forced bit
agreement on the held-out edits; the ranking runs from the group that costs the most bits to
the one that costs the least. Starting from every candidate quantised, the most sensitive group
still quantised goes back to high precision until the agreement reaches `--min-bit-agreement`:
the smallest set along the ranking that meets it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SearchResult:
    target: float
    ranking: list[tuple[str, float]]  # (group, agreement with only it quantised), most sensitive first
    steps: list[tuple[int, float]] = field(default_factory=list)  # (groups kept so far, agreement)
    kept: list[str] = field(default_factory=list)  # groups kept in high precision

    @property
    def skipped(self) -> bool:
        return not self.steps

    @property
    def agreement(self) -> float | None:
        return self.steps[-1][1] if self.steps else None

    @property
    def reached(self) -> bool | None:
        return None if self.skipped else self.agreement >= self.target

    def to_json(self) -> dict:
        return {"min_bit_agreement": self.target, "skipped": self.skipped, "reached": self.reached,
                "agreement": self.agreement,
                "kept_in_high_precision": self.kept,
                "ranking": [{"group": g, "bit_agreement_alone": a} for g, a in self.ranking],
                "steps": [{"kept": k, "bit_agreement": a} for k, a in self.steps]}

    def table(self) -> str:
        if self.skipped:
            return "sensitivity search skipped (--no-search): every candidate group quantised"
        lines = ["sensitivity (teacher-forced bit agreement with only this group quantised; fp32 elsewhere):"]
        lines += [f"  {i:>3}. {g:<18} {a:.5f}" for i, (g, a) in enumerate(self.ranking, 1)]
        kept = ", ".join(self.kept) or "none"
        lines.append(f"kept in high precision: {len(self.kept)} of {len(self.ranking)} groups ({kept}); "
                     f"all the others quantised: {self.agreement:.5f} "
                     f"({'meets' if self.reached else 'misses'} the {self.target:g} budget)")
        return "\n".join(lines)


def search(candidates: list[str], evaluate: Callable[[set[str]], float], target: float,
           progress: Callable[[str], None] = print) -> SearchResult:
    """`evaluate(quantised_groups)` -> teacher-forced bit agreement of that configuration."""
    ranking = []
    for i, group in enumerate(candidates, 1):
        ranking.append((group, evaluate({group})))
        progress(f"      sensitivity {i}/{len(candidates)}: {group:<18} {ranking[-1][1]:.5f}")
    ranking.sort(key=lambda ga: (ga[1], candidates.index(ga[0])))
    result = SearchResult(target, ranking)
    quantised = set(candidates)
    result.steps.append((0, evaluate(quantised)))
    for group, _ in ranking:
        if result.reached or len(quantised) == 1:
            break
        quantised.discard(group)
        result.kept.append(group)
        result.steps.append((len(result.kept), evaluate(quantised)))
        progress(f"      keeping {len(result.kept)} group(s) in high precision: {result.steps[-1][1]:.5f}")
    return result
