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
import stat
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

    def sha256(self, path: str | Path, st: os.stat_result | None = None) -> str:
        """The file's digest; `st` its `os.stat` when the caller has it already."""
        st = os.stat(path) if st is None else st
        key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]
        entry = self.entries.get(str(path))
        if entry is not None and entry[:5] == key:
            return entry[5]
        digest = file_sha256(Path(path))
        self.hashed += 1
        self.entries[str(path)] = [*key, digest]
        return digest

    def save(self) -> None:
        """Write the entries back (only when a file was hashed: an unchanged set costs no write)."""
        if self.path is None or not self.hashed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.entries))
        tmp.replace(self.path)


# links named `source/...` describe where the content is listed (a CSV, a folder tree): their
# change re-runs the stage that reads them, but `content_sha256` leaves them out, so the same
# files listed another way give the same content digest
SOURCE = "source/"


def digest(links: dict[str, Path], cache: DigestCache) -> str:
    """One SHA-256 over the link names and the bytes of every file they reach (a folder's
    files in sorted order, links followed). Plain `os` calls: this runs over every image of a
    reference set at each check."""
    h = hashlib.sha256()
    for name in sorted(links):
        target = str(links[name])
        st = os.stat(target)
        if not stat.S_ISDIR(st.st_mode):
            h.update(name.encode() + b"\0" + bytes.fromhex(cache.sha256(target, st)))
            continue
        for top, dirs, files in os.walk(target, followlinks=True):
            dirs.sort()
            for f in sorted(files):
                full = os.path.join(top, f)
                rel = f"{name}/{os.path.relpath(full, target)}"
                h.update(rel.encode() + b"\0" + bytes.fromhex(cache.sha256(full)))
    return h.hexdigest()


def sync(folder: Path, links: dict[str, Path], cache: DigestCache) -> dict:
    """Make `folder` hold exactly `links` (relative name -> absolute target, a file or a
    folder) as symbolic links, plus `digest.json`; links already right are left alone (their
    inode and times stay, so DVC's state still knows them). Returns the digest record."""
    folder.mkdir(parents=True, exist_ok=True)
    root = str(folder)
    wanted = {os.path.normpath(name): str(target) for name, target in links.items()}
    for top, dirs, files in os.walk(root, topdown=False):  # stale links and empty folders
        for name in files + dirs:
            full = os.path.join(top, name)
            if os.path.islink(full):
                if os.path.relpath(full, root) not in wanted:
                    os.unlink(full)
            elif name in dirs and not os.listdir(full):
                os.rmdir(full)
    made = set()
    for rel, target in wanted.items():
        full = os.path.join(root, rel)
        try:
            if os.readlink(full) == target:
                continue
            os.unlink(full)
        except FileNotFoundError:
            pass
        except OSError:  # there, but not a link
            os.unlink(full)
        parent = os.path.dirname(full)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        os.symlink(target, full, target_is_directory=os.path.isdir(target))
    content = {name: target for name, target in links.items() if not name.startswith(SOURCE)}
    record = {"sha256": digest(links, cache), "content_sha256": digest(content, cache), "files": len(links),
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
