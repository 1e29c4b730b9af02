"""Files outside the project (pipeline.core.external): links DVC follows, and digests that
re-read a file only when it changed."""

from __future__ import annotations

import json
import os

from pipeline.core.external import DigestCache, sync


def test_a_repeated_digest_reads_only_changed_files(tmp_path):
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
    store = tmp_path / "cache.json"
    first = DigestCache(store)
    digests = [first.sha256(f) for f in files]
    first.save()
    assert first.hashed == 3
    again = DigestCache(store)
    assert [again.sha256(f) for f in files] == digests and again.hashed == 0
    files[1].write_bytes(b"\xff" * 1000)  # same size, same path
    third = DigestCache(store)
    assert third.sha256(files[1]) != digests[1] and third.hashed == 1
    assert third.sha256(files[0]) == digests[0] and third.hashed == 1


def test_sync_mirrors_exactly_the_links_and_their_digest(tmp_path):
    src = tmp_path / "src"
    (src / "folder").mkdir(parents=True)
    (src / "a.csv").write_text("a")
    (src / "folder" / "x.png").write_bytes(b"x")
    out = tmp_path / "external" / "role"
    cache = DigestCache()
    first = sync(out, {"a.csv": src / "a.csv", "images/0-x.png": src / "folder" / "x.png", "tree": src / "folder"},
                 cache)
    assert os.readlink(out / "a.csv") == str(src / "a.csv") and (out / "tree").is_symlink()
    assert json.loads((out / "digest.json").read_text()) == first
    inode = (out / "a.csv").lstat().st_ino
    (src / "folder" / "x.png").write_bytes(b"y")
    second = sync(out, {"a.csv": src / "a.csv", "tree": src / "folder"}, cache)
    assert second["sha256"] != first["sha256"]
    assert (out / "a.csv").lstat().st_ino == inode  # a link already right is left alone
    assert not (out / "images").exists()  # the stale link and its empty folder are gone
    assert sync(out, {}, cache)["files"] == 0 and sorted(p.name for p in out.iterdir()) == ["digest.json"]
