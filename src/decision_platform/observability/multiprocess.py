"""Prometheus multiprocess mode for ``serve --workers N``: prepare the shared directory.

prometheus_client decides at import time whether a process writes its samples to files, from the
``PROMETHEUS_MULTIPROC_DIR`` environment variable. So the directory must be set, and emptied of files
left by earlier runs (their counters would be added to ours), in the parent *before* it starts the
workers; the workers inherit the variable. This module does not import prometheus_client on purpose:
the parent calls it before anything else could.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(workers: int, default_dir: Path) -> Path | None:
    """Use ``$PROMETHEUS_MULTIPROC_DIR`` if set, else ``default_dir`` when ``workers > 1``; empty it and
    export it to the children. Returns the directory, or None when one process needs no files."""
    configured = os.environ.get(ENV_VAR)
    if not configured and workers <= 1:
        return None
    directory = Path(configured) if configured else Path(default_dir)
    if directory.exists():
        # Only the *.db sample files: the directory may be a mount point or hold a user's README.
        for stale in directory.glob("*.db"):
            stale.unlink()
    else:
        directory.mkdir(parents=True)
    os.environ[ENV_VAR] = str(directory)
    return directory
