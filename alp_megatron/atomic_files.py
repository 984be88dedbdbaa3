"""Files replaced whole or not at all: written beside their target, synced, then renamed over it."""

from __future__ import annotations

import os


def write_text_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text``; a crash leaves either the old file or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
