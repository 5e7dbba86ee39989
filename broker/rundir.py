"""A process's run directory (logs, pidfiles, locks): readable by its owner only.

Logs carry prompts and request ids, pidfiles say which process to signal: on a shared
host neither is anyone else's business. Directories are made 0700 and files 0600,
whatever the umask. The run directory itself is made 0700 when missing but left as it
is when it exists (an operator may point it at a shared parent); the subdirectories
this code names (logs/, pids/, locks/) are always tightened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

DIR_MODE = 0o700
FILE_MODE = 0o600


def run_dir(path: str | Path, subdirs: tuple[str, ...] = ("logs", "pids")) -> Path:
    """The run directory (0700 if this call makes it) and its `subdirs`, each 0700."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for name in subdirs:
        sub = path / name
        sub.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(sub, DIR_MODE)
    return path


def open_private(path: str | Path, mode: str = "ab") -> IO:
    """Open (creating it 0600) a file of the run directory; an existing one is made 0600 too."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode.startswith("a") else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, mode)


def write_private(path: str | Path, text: str) -> None:
    with open_private(path, "w") as f:
        f.write(text)
