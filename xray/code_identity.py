"""Which code made a result: one place for both forms of xray's identity.

    code_version()   "xray 0.1.0 (abc1234, code 5f3e...)": for people, stored in every run row
    code_key()       "5f3e2a9c01bd": a hash of what can change a score, for machines (the
                     nightly job scans into a fresh folder when it changes)

The git commit is only known in a checkout; the code key is known everywhere (a wheel too), so a
run's code_version names both.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

from xray import __version__

# Libraries whose version can change a score (the code key hashes their versions); timm builds
# the `timm:` architectures (an optional extra: "absent" when not installed).
SCORE_DEPENDENCIES = ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "scikit-image",
                      "safetensors", "pillow", "timm")

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_key() -> str:
    """Hash of xray's source (every .py, .j2, .yaml under the package) and of the versions of
    SCORE_DEPENDENCIES. Computed once per process: the code that runs is the code imported."""
    digest = hashlib.sha256()
    for path in sorted(p for p in _PACKAGE.rglob("*") if p.suffix in (".py", ".j2", ".yaml")
                       and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    for name in SCORE_DEPENDENCIES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{name}=={version}".encode())
    return digest.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The short commit of the checkout xray runs from, or "" outside one."""
    try:
        return subprocess.run(["git", "-C", str(_PACKAGE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def code_version() -> str:
    """xray's version, the git commit when there is one, and the code key."""
    commit = git_commit()
    return f"xray {__version__} ({commit + ', ' if commit else ''}code {code_key()})"
