"""Stage 2: routing analysis — layer band and task experts (DESIGN.md, "The method" 2)."""

from __future__ import annotations

from typing import Sequence


def resolve_band(start: float, end: float, moe_layers: Sequence[int], num_layers: int | None = None) -> list[int]:
    """The MoE layers inside a depth-fraction band [start, end).

    Rounding rule: decoder layer l of L is inside when its centre (l + 0.5) / L lies in [start, end)
    (the last band may close at 1.0: end == 1.0 includes the last layer). L is the model's number of
    decoder layers (default: last MoE layer + 1); dense layers are never returned.
    """
    n = num_layers if num_layers is not None else (max(moe_layers) + 1 if moe_layers else 0)
    return [l for l in moe_layers if start <= (l + 0.5) / n < end or (end >= 1.0 and (l + 0.5) / n >= start)]
