"""Where lowbit caches what it builds or converts: compiled kernels, the model zoo's conversions.

``$LOWBIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache directory (created), or a sub-directory of it."""
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "lowbit"
    )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
