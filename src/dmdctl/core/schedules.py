"""Learning-rate schedules, as multipliers of the peak rate (``LambdaLR``)."""

from __future__ import annotations

import math


def warmup_then(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up over ``warmup`` steps, then ``cosine`` decay to 0 at ``total`` or
    ``constant``. Used by train-teacher (cosine) and distill (``--lr-schedule``)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
