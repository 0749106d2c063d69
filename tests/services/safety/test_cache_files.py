from __future__ import annotations

import os
from pathlib import Path

from services.safety.cache_files import keep_newest


def test_only_the_newest_matching_files_are_kept(tmp_path: Path) -> None:
    for i in range(5):
        old = tmp_path / f"model-{i}.bin"
        old.write_bytes(b"x")
        os.utime(old, (1000 + (i * 7) % 5, 1000 + (i * 7) % 5))  # mtimes 0, 2, 4, 1, 3
    (tmp_path / "other.txt").write_text("not matched")
    keep_newest(tmp_path, "model-*.bin", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-2.bin", "model-4.bin",
                                                          "other.txt"]
    keep_newest(tmp_path, "model-*.bin", 0)
    assert [p.name for p in tmp_path.iterdir()] == ["other.txt"]
    keep_newest(tmp_path / "missing", "model-*.bin", 1)  # no folder: nothing to do
