"""The groups of a summary: all, attack (that attack's trojaned models and every clean one),
architecture, and each tag key's values."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd


def _groups(
    models: pd.DataFrame, group_by: Sequence[str] | None
) -> list[tuple[str, str, np.ndarray]]:
    """(group_by, group, boolean mask over `models`) for every group asked for."""
    tag_keys = sorted({k for tags in models["tags"] for k, v in tags.items() if _scalar(v)})
    if group_by is None:
        group_by = ["attack", "architecture", *tag_keys]
    y = models["y"].to_numpy()
    out = [("all", "all", np.ones(len(models), dtype=bool))]
    for name in group_by:
        if name == "all":
            continue
        if name == "attack":
            attacks = models["attack"].to_numpy()
            for value in sorted(set(attacks[y == 1])):
                out.append(("attack", value, ((y == 1) & (attacks == value)) | (y == 0)))
        elif name == "architecture":
            archs = models["architecture"].to_numpy()
            for value in sorted(set(archs)):
                out.append(("architecture", value, archs == value))
        else:
            values = np.array(
                [str(t[name]) if name in t and _scalar(t[name]) else None for t in models["tags"]],
                dtype=object,
            )
            for value in sorted({v for v in values if v is not None}):
                out.append((name, value, values == value))
    return out


def _scalar(value: Any) -> bool:
    return value is not None and not isinstance(value, (dict, list))
