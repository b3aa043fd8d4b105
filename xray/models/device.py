"""Device names as the run config and the zoo recipes spell them: 'cpu', 'cuda', 'cuda:N', or
'auto' (cuda when this machine has one, else cpu)."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
