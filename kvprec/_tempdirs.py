"""Hidden temporary directories beside a target, for writes that appear whole or not at all.

A writer makes ``<parent>/<prefix><pid>-<random>`` (:func:`new_temporary`), fills it, and renames it onto the target.
A process killed before it could clean up leaves its temporary behind; :func:`remove_dead_temporaries` removes those
whose process no longer exists and keeps a live process's, which is a write in progress. Used by the SmolLM2
conversion (kvprec/models/smollm2.py) and the study run directories (kvprec/studies/platform/rundir.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_dead_temporaries(parent: Path, prefix: str) -> None:
    """Remove the entries ``<prefix><pid>-*`` of ``parent`` whose process no longer exists."""
    for entry in Path(parent).glob(prefix + "*"):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def new_temporary(parent: Path, prefix: str) -> Path:
    """A new empty directory ``<parent>/<prefix><this pid>-<random>`` with the permissions of an ordinary directory
    (mkdtemp makes it private to the user)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f"{prefix}{os.getpid()}-"))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp
