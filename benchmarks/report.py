"""The shape every scenario returns, and how it is printed and saved."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Report:
    """`results`: NAME -> {metric: value}; `ratios`: NAME -> float (ours / baseline)."""

    scenario: str
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)  # ratio name -> e.g. ">= 3.0"
    notes: list[str] = field(default_factory=list)
    # the machine it ran on: this one for a new report, the saved one for a loaded report
    measured_on: dict[str, Any] = field(default_factory=lambda: machine())

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "results": self.results,
            "ratios": self.ratios,
            "targets": self.targets,
            "notes": self.notes,
            "machine": self.measured_on,
        }

    def render(self) -> str:
        lines = [f"== {self.scenario} =="]
        for name, metrics in self.results.items():
            shown = ", ".join(f"{key}={_fmt(value)}" for key, value in metrics.items())
            lines.append(f"  {name:<28} {shown}")
        for name, value in self.ratios.items():
            target = self.targets.get(name, "")
            verdict = ""
            if target:
                verdict = "  ok" if meets_target(value, target) else "  BELOW TARGET"
            lines.append(f"  ratio {name:<22} {value:8.2f}   target {target or '-'}{verdict}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.as_json(), indent=2) + "\n")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def meets_target(value: float, target: str) -> bool:
    """`target` is like '>= 0.85' or '<= 250'."""
    op, _, number = target.partition(" ")
    return value >= float(number) if op == ">=" else value <= float(number)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
