"""The on-disk binary cache: keys, entries, atomic publishing, listing and clearing.

Layout under cache_dir()::

    <spec.name>-<key12>/            one published entry: the library and manifest.json
    <spec.name>-<key12>.lock        its build lock (filelock), and .owner: who holds it
    .tmp-<spec.name>-<key12>@<host>@<pid>@<rand>/   a build in progress (or a dead one)
    logs/                           compile-failure and prebuild logs

An entry is built in a temp folder beside it (same filesystem), its manifest written last, and
the folder renamed into place, so a reader sees either nothing or a complete entry. The key
digests everything that changes the binary; the folder name carries its first 12 hex digits.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from . import env
from .paths import cache_dir, csrc_dir
from .spec import JitSpec

MANIFEST = "manifest.json"
FORMAT = 1  # bump when the entry layout or key fields change meaning
LOGS = "logs"
_TMP_PREFIX = ".tmp-"
_ENTRY_NAME = re.compile(r"^[A-Za-z0-9_\-]+-[0-9a-f]{12}$")


class CacheDirError(RuntimeError):
    """The cache directory cannot be written."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sources_digest(root: Path) -> str:
    """sha256 over every file under ``root`` (relative path and content), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def key_fields(spec: JitSpec, root: Path | None = None) -> dict:
    """Everything that changes the binary of ``spec``; its canonical JSON digest is the key."""
    import torch

    root = csrc_dir() if root is None else root
    return {
        "format": FORMAT,
        "flashjit": __version__,
        "spec": spec.fields(),
        "sources": sources_digest(root),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "python": sys.implementation.cache_tag,
        "machine": platform.machine(),
        "cxx": env.cxx_version(),
        "nvcc": env.nvcc_version() if spec.with_cuda else None,
        "cflags": spec.cflags(),
        "cuda_cflags": spec.cuda_cflags(),
    }


def digest_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class EntryState:
    """What a look at an entry found: "ok" (with its library), "missing" or "damaged" (why)."""

    status: str
    library: Path | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _damaged(reason: str) -> EntryState:
    return EntryState("damaged", reason=reason)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class CacheEntry:
    """One spec's place in the cache, for one key."""

    root: Path
    spec_name: str
    key: str
    fields: dict

    @classmethod
    def for_spec(cls, spec: JitSpec, root: Path | None = None, csrc: Path | None = None) -> CacheEntry:
        fields = key_fields(spec, csrc)
        return cls(cache_dir() if root is None else root, spec.name, digest_key(fields), fields)

    @property
    def dirname(self) -> str:
        return f"{self.spec_name}-{self.key[:12]}"

    @property
    def path(self) -> Path:
        return self.root / self.dirname

    @property
    def lock_path(self) -> Path:
        return self.root / (self.dirname + ".lock")

    @property
    def owner_path(self) -> Path:
        return self.root / (self.dirname + ".owner")

    def check(self, verify: bool = False) -> EntryState:
        """Look at the entry without changing it. ``verify`` also checks the library's sha256."""
        if not self.path.exists():
            return EntryState("missing")
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            library_name, size, key = manifest["library"], manifest["size"], manifest["key"]
        except FileNotFoundError:
            return _damaged(f"{MANIFEST} is missing")
        except (OSError, ValueError, KeyError, TypeError) as err:
            return _damaged(f"{MANIFEST} is unreadable ({type(err).__name__}: {err})")
        if key != self.key:
            return _damaged(f"{MANIFEST} is for another key")
        if not isinstance(library_name, str) or Path(library_name).name != library_name:
            return _damaged(f"{MANIFEST} names no valid library file")
        library = self.path / library_name
        try:
            actual = library.stat().st_size
        except FileNotFoundError:
            return _damaged(f"{library_name} is missing")
        if actual != size:
            return _damaged(f"{library_name} has {actual} bytes, the manifest says {size}")
        if verify and file_sha256(library) != manifest.get("sha256"):
            return _damaged(f"{library_name} does not match the manifest's sha256")
        return EntryState("ok", library=library)

    def remove(self) -> None:
        shutil.rmtree(self.path)

    def new_temp_dir(self) -> Path:
        """A fresh build folder beside the entry; removes dead builders' folders first.

        Call it holding the entry's lock: then any temp folder of this key belongs to a builder
        that died. Temp folders of other keys are removed when made on this host by a process
        that no longer runs.
        """
        own_prefix = f"{_TMP_PREFIX}{self.dirname}@"
        host = socket.gethostname()
        for old in self.root.glob(_TMP_PREFIX + "*"):
            parts = old.name.split("@")
            dead_here = (
                len(parts) == 4 and parts[1] == host and parts[2].isdigit()
                and not _pid_alive(int(parts[2]))
            )
            if old.name.startswith(own_prefix) or dead_here:
                shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / f"{own_prefix}{host}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def publish(self, tmp: Path, library_name: str, build_seconds: float) -> Path:
        """Write the manifest into ``tmp`` (last), then rename ``tmp`` into place."""
        library = tmp / library_name
        manifest = {
            "format": FORMAT,
            "name": self.spec_name,
            "key": self.key,
            "key_fields": self.fields,
            "library": library_name,
            "size": library.stat().st_size,
            "sha256": file_sha256(library),
            "build_seconds": round(build_seconds, 2),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        _fsync(library)
        manifest_path = tmp / MANIFEST
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        os.rename(tmp, self.path)
        _fsync(self.root)
        return self.path / library_name


def ensure_writable(root: Path) -> None:
    """Create ``root`` and prove a file can be made in it, else raise CacheDirError."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise CacheDirError(
            f"flashjit: cannot write to the cache directory {root} ({err}). Set "
            "FLASHJIT_CACHE_DIR to a writable directory."
        ) from None


def logs_dir(root: Path) -> Path:
    path = root / LOGS
    path.mkdir(parents=True, exist_ok=True)
    return path


def list_entries(root: Path) -> list[dict]:
    """Published entries (and damaged ones) in ``root``, sorted by name."""
    entries = []
    if not root.is_dir():
        return entries
    for path in sorted(root.iterdir()):
        if not path.is_dir() or not _ENTRY_NAME.match(path.name):
            continue
        info = {"dirname": path.name, "path": str(path), "bytes": dir_size(path)}
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            info.update(name=manifest["name"], date=manifest["date"],
                        build_seconds=manifest["build_seconds"], ok=True)
        except (OSError, ValueError, KeyError, TypeError):
            info.update(name=path.name.rsplit("-", 1)[0], date=None, build_seconds=None, ok=False)
        entries.append(info)
    return entries


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def clear(root: Path) -> int:
    """Remove what flashjit put in ``root`` (entries, locks, temp folders, logs); returns a count.

    Only names flashjit makes are touched, so a mistaken FLASHJIT_CACHE_DIR (say $HOME) loses
    nothing else. Do not run it while builds are in progress.
    """
    removed = 0
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        name = path.name
        stem = name.rsplit(".", 1)[0] if name.endswith((".lock", ".owner")) else None
        if path.is_dir() and (_ENTRY_NAME.match(name) or name.startswith(_TMP_PREFIX) or name == LOGS):
            shutil.rmtree(path, ignore_errors=True)
        elif stem is not None and _ENTRY_NAME.match(stem):
            path.unlink(missing_ok=True)
        else:
            continue
        removed += 1
    return removed
