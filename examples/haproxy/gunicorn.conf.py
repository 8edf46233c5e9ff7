"""gunicorn hooks: one instance directory shared by all the workers of this server.

``gunicorn -c examples/haproxy/gunicorn.conf.py -w 4 ...``: the master makes a fresh directory
before forking the workers and exports it as ``SHEDDER_INSTANCE_DIR``, which the middleware
and the agent read, so ``/health/load`` and the agent report the whole instance. An existing
``SHEDDER_INSTANCE_DIR`` is kept (and not removed on exit).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

_created: list[str] = []


def on_starting(server: Any) -> None:
    if not os.environ.get("SHEDDER_INSTANCE_DIR"):
        directory = tempfile.mkdtemp(prefix="shedder-")
        _created.append(directory)
        os.environ["SHEDDER_INSTANCE_DIR"] = directory  # inherited by the forked workers


def on_exit(server: Any) -> None:
    for directory in _created:
        shutil.rmtree(directory, ignore_errors=True)
