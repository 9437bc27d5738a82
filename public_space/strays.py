"""Files that Gradio leaves in its cache folder when an upload fails, which no one would ever remove.

Checked on gradio 6.31 (tests/test_hardening.py): a page's run and a gradio_client run leave only the upload
(`<cache>/<sha256>/<name>`) and the two pictures `Files.save_result` writes; the run itself writes nothing (the
endpoint neither preprocesses nor postprocesses, and a path already in the cache is not copied). An upload that
fails does leave files: Gradio receives each uploaded file into a temporary file in the cache folder itself
(`<cache>/tmpXXXXXXXX`), and
- when the client goes away mid-upload, the temporary files stay (Gradio cleans up only after a parse error);
- when one file name of several is refused (400, "Invalid file name"), the files before it are already in their
  content folders and the rest stay as temporary files.
No answer names these files, so they belong to no one: files.py removes them (`Files.sweep_strays`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Container
from pathlib import Path

CONTENT_FOLDER = re.compile(r"[0-9a-f]{64}")  # Gradio's folder per content (sha256)


def unknown(cache_dir: Path, kept: Container[Path]) -> list[Path]:
    """The files directly in `cache_dir` and in its content folders that are not `kept`, and the content folders
    left empty. Other folders (Gradio's own, made at start) are not looked into."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(cache_dir))
    except OSError:
        return found
    for entry in entries:
        path = Path(entry.path)
        try:
            if entry.is_file(follow_symlinks=False):
                if path not in kept:
                    found.append(path)
            elif entry.is_dir(follow_symlinks=False) and CONTENT_FOLDER.fullmatch(entry.name):
                inside = [Path(sub.path) for sub in os.scandir(path)]
                found += [sub for sub in inside if sub not in kept] if inside else [path]
        except OSError:  # removed while it was looked at
            continue
    return found
