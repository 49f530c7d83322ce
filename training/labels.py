"""The label table of the paraspinal model, as written into every bundle.

Numbering (patient side): 0 background, 1 multifidus R, 2 multifidus L, 3 erector spinae R,
4 erector spinae L, 5 psoas major R, 6 psoas major L, 7 quadratus lumborum R,
8 quadratus lumborum L. The table itself (names, codes, colours) lives in
``training/labels.json``; the application reads it only from the bundle metadata.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

LABELS_JSON = Path(__file__).resolve().parent / "labels.json"
NUM_CLASSES = 9  # background + 4 muscles x 2 sides
ALL_CLASSES: tuple[int, ...] = tuple(range(NUM_CLASSES))

# Left/right partner of every label: used when an image is mirrored left-right,
# because "R"/"L" is the patient's side and mirroring swaps it.
SIDE_SWAP: dict[int, int] = {0: 0, 1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5, 7: 8, 8: 7}


@lru_cache(maxsize=1)
def label_table() -> dict[str, Any]:
    """The bundle label table: ``labels``, ``category``, ``laterality`` (copied from labels.json)."""
    raw = json.loads(LABELS_JSON.read_text())
    return {key: raw[key] for key in ("labels", "category", "laterality")}


def label_name(value: int) -> str:
    """Human-readable name, e.g. ``"multifidus R"``; ``"background"`` for 0."""
    if value == 0:
        return "background"
    entry = label_table()["labels"][str(value)]
    return f"{entry['muscle']} {'R' if entry['side'] == 'right' else 'L'}"
