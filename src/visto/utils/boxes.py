"""Box arithmetic shared by data code and metrics (plain Python numbers, no tensors)."""

from __future__ import annotations

from collections.abc import Sequence

Box = Sequence[float]  # (x1, y1, x2, y2), any one coordinate system per comparison


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes in one coordinate system.

    Coordinates are continuous (x2 - x1 is the width), the convention of pixel boxes with
    exclusive x2/y2 and of 0..999 boxes alike; a degenerate box has IoU 0 with everything.
    """
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def match_boxes(truth: Sequence[Box], found: Sequence[Box], threshold: float = 0.5) -> dict[int, int]:
    """Greedy one-to-one matching by IoU, best pairs first: {truth index: found index} for the
    pairs at IoU >= threshold."""
    pairs = sorted(((box_iou(t, f), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)),
                   reverse=True)  # fmt: skip
    matched: dict[int, int] = {}
    used: set[int] = set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i not in matched and j not in used:
            matched[i] = j
            used.add(j)
    return matched


__all__ = ["Box", "box_iou", "match_boxes"]
