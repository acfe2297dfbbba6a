"""Writing a small file so that a reader (or a crash) never sees half of it."""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary sibling: written, flushed to disk, renamed over `path`,
    and the directory entry synced. A reader finds the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
