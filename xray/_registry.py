"""A registry of builders by name (the timm pattern): register, get, available.

Used for architectures (xray.models) and detectors (xray.detectors); a duplicate name is an error
and an unknown one names the valid choices.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """The tail `; did you mean 'x'?` naming the closest of `choices`, or "" if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            hint = did_you_mean(name, self._entries)
            raise KeyError(f"unknown {self.kind} {name!r}{hint or ';'} available: "
                           f"{', '.join(sorted(self._entries))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def available(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))
