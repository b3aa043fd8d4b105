"""Progress of long work: items done / total, rate, ETA and failures, on stderr (tqdm)."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """A tqdm bar that also counts failures; `disable=True` for quiet library use."""

    def __init__(self, total: int, desc: str, unit: str = "model", disable: bool = False) -> None:
        self.failures = 0
        self.done = 0
        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                         dynamic_ncols=True, mininterval=1.0, smoothing=0.1)
        self._bar.set_postfix(failures=0)

    def update(self, ok: bool = True, n: int = 1, **postfix: object) -> None:
        self.done += n
        if not ok:
            self.failures += n
        self._bar.set_postfix(failures=self.failures, **postfix, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
