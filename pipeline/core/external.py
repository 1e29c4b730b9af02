"""Files outside the project that params.yaml names (weights, the reference CSV and its images,
retention folders, a dataset's files), made visible to DVC.

DVC hashes only paths inside the project. The `check` stage therefore mirrors every external
file as a symbolic link under `data/external/<role>/` (`sync`), one folder per kind of input,
and the stages that read them list that folder as a dependency: DVC follows the links, so a
file rewritten at the same path changes the folder's hash, `dvc status` lists the stage and
`dvc repro` re-runs it. DVC keeps the hashes in its state database, keyed by each file's
inode, size and modification time, so a repeated `dvc status` only stats the files.

Each folder also holds `digest.json`: the sources and one SHA-256 over all of them, which a
stage copies into its own outputs so that what reads those outputs re-runs too (`prepare`
does, for the reference set and the dataset). Those digests come from `DigestCache`: a file
is hashed again only when its size, modification time, inode or change time differ from
the cached entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.core.hashing import file_sha256

DIGEST = "digest.json"


def absolute(path: str | Path) -> Path:
    """`path` made absolute without resolving symbolic links: a link the user repoints (a
    `latest.safetensors`) is followed anew by DVC, as it is by the stages."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


class DigestCache:
    """SHA-256 of files, remembered by (size, mtime_ns, inode, device, ctime_ns) in a JSON
    file: a repeated digest of an unchanged file costs one `stat`. `path` None: in memory."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.entries: dict[str, list] = {}
        self.hashed = 0  # files read in full by this instance (the benchmark reports it)
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, path: Path) -> str:
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]
        entry = self.entries.get(str(path))
        if entry is not None and entry[:5] == key:
            return entry[5]
        digest = file_sha256(path)
        self.hashed += 1
        self.entries[str(path)] = [*key, digest]
        return digest

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries))
        tmp.replace(self.path)


def files_under(target: Path) -> list[Path]:
    """`target` itself (a file) or every file under it (a folder, links followed), sorted."""
    if not target.is_dir():
        return [target]
    out = []
    for top, dirs, files in os.walk(target, followlinks=True):
        dirs.sort()
        out.extend(Path(top) / f for f in sorted(files))
    return out


def digest(links: dict[str, Path], cache: DigestCache) -> str:
    """One SHA-256 over the link names and the bytes of every file they reach."""
    h = hashlib.sha256()
    for name in sorted(links):
        target = links[name]
        for f in files_under(target):
            rel = name if f == target else f"{name}/{f.relative_to(target)}"
            h.update(rel.encode() + b"\0" + bytes.fromhex(cache.sha256(f)))
    return h.hexdigest()


def sync(folder: Path, links: dict[str, Path], cache: DigestCache) -> dict:
    """Make `folder` hold exactly `links` (relative name -> absolute target, a file or a
    folder) as symbolic links, plus `digest.json`; links already right are left alone (their
    inode and times stay, so DVC's state still knows them). Returns the digest record."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {Path(name): Path(target) for name, target in links.items()}
    for top, dirs, files in os.walk(folder, topdown=False):  # stale links and empty folders
        for name in files + dirs:
            p = Path(top) / name
            rel = p.relative_to(folder)
            if p.is_symlink():
                if rel not in wanted:
                    p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
    for rel, target in wanted.items():
        p = folder / rel
        if p.is_symlink() and os.readlink(p) == str(target):
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target, target_is_directory=target.is_dir())
    record = {"sha256": digest(links, cache), "files": len(links),
              "sources": {name: str(target) for name, target in sorted(links.items())}}
    text = json.dumps(record, indent=1) + "\n"
    marker = folder / DIGEST
    if not marker.is_file() or marker.read_text() != text:
        marker.write_text(text)
    return record


def read_digest(folder: Path) -> dict:
    """The record `sync` wrote into `folder` (FileNotFoundError naming the stage that makes it)."""
    marker = folder / DIGEST
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} not found: run `dvc repro check` first")
    return json.loads(marker.read_text())
