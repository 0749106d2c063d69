"""The safety service's cached artifacts (the classifier's weights, the rule prefilter's
database): each code version leaves one file in the cache folder, and checkouts of
different versions may share the folder, so only the newest few are kept."""

from __future__ import annotations

from pathlib import Path


def keep_newest(folder: Path, pattern: str, num_kept: int) -> None:
    """Removes all but the ``num_kept`` most recently written files of ``folder`` that
    match the glob ``pattern`` (a file another process removed first is no error)."""
    def written(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    for old in sorted(folder.glob(pattern), key=written, reverse=True)[num_kept:]:
        old.unlink(missing_ok=True)
