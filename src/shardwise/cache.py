"""Where shardwise keeps what it makes or fetches (models, built kernels): $SHARDWISE_CACHE, else
~/.cache/shardwise. The ground floor: every part may ask, none is asked in return."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDWISE_CACHE") or Path.home() / ".cache" / "shardwise")
