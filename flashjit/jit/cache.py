"""The on-disk binary cache: keys, entries, atomic publishing, listing and clearing.

Layout under cache_dir()::

    <spec.name>-<key12>/            one published entry: the library, manifest.json, .flashjit-entry
    <spec.name>-<key12>.lock        its build lock (filelock), and .owner: who holds it
    .tmp-<spec.name>-<key12>@<host>@<pid>@<rand8>/  a build in progress (or a dead one)
    logs/                           compile-failure logs (<spec.name>-<date>-<time>.log) and
                                    prebuild-<date>-<time>-<pid>/ folders of per-spec logs

An entry is built in a temp folder beside it (same filesystem), its manifest written last, and
the folder renamed into place, so a reader sees either nothing or a complete entry. The key
digests everything that changes the binary; the folder name carries its first 12 hex digits.

The cache dir may be shared with other files (FLASHJIT_CACHE_DIR set to a folder in use), so
listing and clearing go by what a file holds, not by its name alone (scan()): the first file a
build writes into its temp folder is the marker ``.flashjit-entry``, and publish writes it again
before the manifest, so even a damaged entry is recognisably flashjit's. Entries published
before the marker existed are recognised by a manifest that names their folder.
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
from dataclasses import dataclass, field
from pathlib import Path

from .._version import __version__
from . import env
from .paths import cache_dir, cache_dir_problem, csrc_dir
from .spec import JitSpec

MANIFEST = "manifest.json"
MARKER = ".flashjit-entry"  # written first in every build folder: "flashjit made this folder"
FORMAT = 1  # bump when the entry layout or key fields change meaning
LOGS = "logs"
_TMP_PREFIX = ".tmp-"
_NAME = r"[A-Za-z0-9_\-]+"  # a spec name
_ENTRY_NAME = re.compile(rf"^{_NAME}-[0-9a-f]{{12}}$")
_TMP_NAME = re.compile(rf"^\.tmp-(?P<entry>{_NAME}-[0-9a-f]{{12}})@(?P<host>[^@]+)@(?P<pid>\d+)"
                       r"@[0-9a-f]{8}$")
# what torch.utils.cpp_extension leaves in a build folder (ninja files, its baton, objects, the
# library): a temp folder holding only these is a build's even without the marker
_BUILD_FILES = re.compile(r"^(build\.ninja|\.ninja_log|\.ninja_deps|lock|.+\.o|.+\.so)$")
_OWNER_TEXT = re.compile(r"^\S+ pid \d+ since \S+\n?$")  # what BuildLock writes
_BUILD_LOG = re.compile(rf"^(?P<spec>{_NAME})-\d{{8}}-\d{{6}}\.log$")  # build.py's failure log
_PREBUILD_LOGS = re.compile(r"^prebuild-\d{8}-\d{6}-(?P<pid>\d+)$")  # prebuild's folder, one per run
_SPEC_LOG = re.compile(rf"^{_NAME}\.log$")  # in it, one log per spec
_SMALL = 4096  # bytes: a lock or owner file is far smaller


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
        """A fresh build folder beside the entry, holding the marker; removes dead builders'
        folders first.

        Call it holding the entry's lock: then any temp folder of this key belongs to a builder
        that died. Temp folders of other keys are removed when made on this host by a process
        that no longer runs. Only folders scan() counts as flashjit's temp folders are touched.
        """
        host = socket.gethostname()
        for old in self.root.glob(_TMP_PREFIX + "*"):
            match = _TMP_NAME.match(old.name)
            if match is None or not _is_temp_dir(old):
                continue
            dead_here = match["host"] == host and not _pid_alive(int(match["pid"]))
            if match["entry"] == self.dirname or dead_here:
                shutil.rmtree(old, ignore_errors=True)
        tmp = self.root / f"{_TMP_PREFIX}{self.dirname}@{host}@{os.getpid()}@{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        self._write_marker(tmp)  # first, so that a build that dies at any point is known as ours
        return tmp

    def _write_marker(self, folder: Path) -> None:
        marker = {"format": FORMAT, "name": self.spec_name, "key": self.key, "flashjit": __version__}
        with open(folder / MARKER, "w") as f:
            json.dump(marker, f, sort_keys=True)
            f.write("\n")

    def publish(self, tmp: Path, library_name: str, build_seconds: float) -> Path:
        """Write the marker and the manifest into ``tmp`` (last), then rename ``tmp`` into place."""
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
        self._write_marker(tmp)  # again: the build's clean-up keeps the library alone
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
        # cache_dir_problem's sentences name FLASHJIT_CACHE_DIR or the dir themselves
        why = (cache_dir_problem(root)
               or f"the cache directory {root} cannot be written ({err.strerror or err})")
        raise CacheDirError(
            f"flashjit: {why}. Set FLASHJIT_CACHE_DIR to a writable directory."
        ) from None


def logs_dir(root: Path) -> Path:
    path = root / LOGS
    path.mkdir(parents=True, exist_ok=True)
    return path


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _read_json(path: Path):
    """The JSON in ``path``; None if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _is_entry(path: Path) -> bool:
    """A folder named like an entry that holds the marker, or (entries published before the
    marker) a manifest naming this folder: flashjit's, damaged or not."""
    if not _ENTRY_NAME.match(path.name) or not _is_dir(path):
        return False
    if _is_file(path / MARKER):
        return True
    manifest = _read_json(path / MANIFEST)
    try:
        return f"{manifest['name']}-{manifest['key'][:12]}" == path.name
    except (KeyError, TypeError):
        return False


def _is_temp_dir(path: Path) -> bool:
    """A folder named like new_temp_dir's that holds the marker, or only what a build makes
    (nothing yet, ninja's files, objects, the library): a live or dead build."""
    if not _TMP_NAME.match(path.name) or not _is_dir(path):
        return False
    if _is_file(path / MARKER):
        return True
    try:
        return all(_BUILD_FILES.match(p.name) and _is_file(p) for p in path.iterdir())
    except OSError:
        return False


def _small_text(path: Path) -> str | None:
    """The text of a small regular file; None for anything else."""
    try:
        if not _is_file(path) or path.stat().st_size > _SMALL:
            return None
        return path.read_text(errors="replace")
    except OSError:
        return None


def _is_lock_file(path: Path, ours: set[str]) -> bool:
    """``<entry>.lock`` (filelock's: empty, or a few bytes on file systems without flock) or
    ``<entry>.owner`` (BuildLock's "host pid N since date"). A non-empty lock file counts only
    beside an entry, temp folder or owner file of its name (``ours``: their entry names)."""
    stem, dot, suffix = path.name.rpartition(".")
    if not dot or suffix not in ("lock", "owner") or not _ENTRY_NAME.match(stem):
        return False
    text = _small_text(path)
    if text is None:
        return False
    if suffix == "owner":
        return text == "" or bool(_OWNER_TEXT.match(text))
    return text == "" or stem in ours


def _is_log(path: Path) -> bool:
    """In logs/: a compile-failure log build.py wrote (``<spec>-<date>-<time>.log`` starting
    with the spec's name and its key fields), or a prebuild folder holding only per-spec logs."""
    match = _BUILD_LOG.match(path.name)
    if match:
        head = f"{match['spec']}\nkey fields: "
        if not _is_file(path):
            return False
        try:
            with open(path, errors="replace") as f:
                return f.read(len(head)) == head
        except OSError:
            return False
    if _PREBUILD_LOGS.match(path.name) and _is_dir(path):
        try:
            return all(_SPEC_LOG.match(p.name) and _is_file(p) for p in path.iterdir())
        except OSError:
            return False
    return False


@dataclass(frozen=True)
class CacheScan:
    """What scan() found in a cache dir: flashjit's items by kind, and the rest (``foreign``:
    files and folders flashjit did not make, which it neither lists nor removes)."""

    entries: list[Path]
    temp_dirs: list[Path]
    lock_files: list[Path]
    logs: list[Path]  # flashjit's log files and prebuild folders inside logs/
    foreign: list[Path]

    @property
    def ours(self) -> list[Path]:
        return self.entries + self.temp_dirs + self.lock_files + self.logs

    def bytes(self) -> int:
        """The size of flashjit's items."""
        return sum(dir_size(p) if _is_dir(p) else p.stat().st_size for p in self.ours
                   if p.exists())


def scan(root: Path) -> CacheScan:
    """Sort what ``root`` holds (its top level, and logs/) into flashjit's items and foreign ones,
    by their content (see _is_entry, _is_temp_dir, _is_lock_file, _is_log); symbolic links are
    always foreign. A missing ``root`` is an empty scan. Reads only, raises nothing for odd
    files."""
    found = CacheScan([], [], [], [], [])
    try:
        children = sorted(root.iterdir()) if root.is_dir() else []
    except OSError:  # unreadable: nothing is known (paths.cache_dir_problem)
        return found
    for path in children:
        if _is_entry(path):
            found.entries.append(path)
        elif _is_temp_dir(path):
            found.temp_dirs.append(path)
    ours = {p.name for p in found.entries} | {_TMP_NAME.match(p.name)["entry"]
                                              for p in found.temp_dirs}
    ours |= {p.name[:-len(".owner")] for p in children if p.name.endswith(".owner")
             and _is_lock_file(p, set())}
    sorted_already = set(found.entries) | set(found.temp_dirs)
    for path in children:
        if path in sorted_already:
            continue
        if _is_lock_file(path, ours):
            found.lock_files.append(path)
        elif path.name == LOGS and _is_dir(path):
            try:
                logs = sorted(path.iterdir())
            except OSError:
                logs = []
            for log in logs:
                (found.logs if _is_log(log) else found.foreign).append(log)
        else:
            found.foreign.append(path)
    return found


def _entry_info(path: Path) -> dict:
    """list_entries()'s row for the entry folder ``path``: ok when CacheEntry.check() finds it
    complete (library of the manifest's size), else the reason it is damaged."""
    spec_name, short_key = path.name.rsplit("-", 1)
    manifest = _read_json(path / MANIFEST)
    manifest = manifest if isinstance(manifest, dict) else {}
    key = manifest.get("key")
    key = key if isinstance(key, str) and key[:12] == short_key else short_key
    state = CacheEntry(path.parent, spec_name, key, {}).check()
    return {"dirname": path.name, "path": str(path), "bytes": dir_size(path),
            "name": manifest.get("name", spec_name) if state.ok else spec_name,
            "date": manifest.get("date") if state.ok else None,
            "build_seconds": manifest.get("build_seconds") if state.ok else None,
            "ok": state.ok, "reason": state.reason}


def list_entries(root: Path, found: CacheScan | None = None) -> list[dict]:
    """Published entries (and damaged ones) in ``root``, sorted by name: the entries of scan()
    (``found``, when the caller has it already), each a dict with dirname, path, bytes, name,
    date, build_seconds, ok and reason (None when ok)."""
    return [_entry_info(path) for path in (scan(root) if found is None else found).entries]


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass
class ClearResult:
    """What clear() did: the number of items it removed, the items it left because a running
    build or prebuild uses them (``in_use``), and those it could not remove (``failed``); both
    lists of (path, why)."""

    removed: int = 0
    in_use: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _stem(path: Path) -> str:
    """The entry name (``<spec.name>-<key12>``) an entry, temp folder, lock or owner file is of."""
    match = _TMP_NAME.match(path.name)
    if match:
        return match["entry"]
    return path.name.rsplit(".", 1)[0] if path.suffix in (".lock", ".owner") else path.name


def _build_in_use(root: Path, stem: str, paths: list[Path], free: bool | None) -> str | None:
    """Why the items ``paths`` of entry ``stem`` are in use, None if they are not: its build lock
    is held (``free`` False, lock.try_hold), or, where the lock could not be tried (None) or had
    no file (a build's lock removed under it), a live process of this host that its owner file
    or a temp folder names."""
    owner = (_small_text(root / f"{stem}.owner") or "").strip()
    spec_name = stem.rsplit("-", 1)[0]
    if free is False:
        return f"a build of {spec_name} holds its lock" + (f": {owner}" if owner else "")
    if free and any(p.suffix == ".lock" for p in paths):
        return None
    host = socket.gethostname()
    pids = [int(owner.split()[2])] if _OWNER_TEXT.match(owner) and owner.split()[0] == host \
        else []
    pids += [int(m["pid"]) for m in map(_TMP_NAME.match, (p.name for p in paths))
             if m and m["host"] == host]
    live = [pid for pid in pids if _pid_alive(pid)]
    return f"a build of {spec_name} is running (pid {live[0]})" if live else None


def _prebuild_running(pid: int) -> bool:
    """Whether ``pid`` is a running ``python -m flashjit.prebuild`` here (where /proc cannot
    tell the command, whether it runs at all)."""
    if not _pid_alive(pid):
        return False
    try:
        return b"flashjit.prebuild" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True


def _remove(path: Path) -> str | None:
    """Remove the file or folder ``path`` (links not followed), as much of it as can be; None
    once it is gone, else why not (the first error, e.g. 'Read-only file system')."""
    errors: list[str] = []

    def note(where, err: BaseException) -> None:
        if not isinstance(err, FileNotFoundError):  # gone meanwhile is fine
            text = getattr(err, "strerror", None) or str(err)
            errors.append(text + (f" ({where})" if str(where) != str(path) else ""))

    if _is_dir(path):
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=lambda _f, where, err: note(where, err))
        else:
            shutil.rmtree(path, onerror=lambda _f, where, info: note(where, info[1]))
    else:
        try:
            path.unlink()
        except OSError as err:
            note(path, err)
    if not os.path.lexists(path):
        return None
    return errors[0] if errors else "it is still there"


def clear(root: Path) -> ClearResult:
    """Remove what flashjit put in ``root`` (entries, locks, temp folders, its logs) and can be
    removed now; never raises for an item it cannot remove.

    Only what scan() finds to be flashjit's is touched, so a mistaken FLASHJIT_CACHE_DIR (say
    $HOME) loses nothing else; logs/ itself goes only once nothing else is left in it. Items in
    use are left and listed in ``in_use``: an entry's items (folder, temp folders, lock and owner
    file) while a build holds its lock (tried without waiting, and held while they are removed,
    so no build of it starts meanwhile), that spec's compile-failure logs with them, and the
    log folder of a prebuild that is still running. What cannot be removed (a read-only file
    system, no permission) is listed in ``failed`` with the reason; the rest is still removed.
    """
    from .lock import try_hold  # lock imports this module

    result = ClearResult()
    found = scan(root)
    by_entry: dict[str, list[Path]] = {}
    for path in found.entries + found.temp_dirs + found.lock_files:
        by_entry.setdefault(_stem(path), []).append(path)
    busy_specs = set()
    for stem, paths in by_entry.items():
        with try_hold(root / f"{stem}.lock") as free:
            why = _build_in_use(root, stem, paths, free)
            if why:
                result.in_use += [(path, why) for path in paths]
                busy_specs.add(stem.rsplit("-", 1)[0])
                continue
            for path in sorted(paths, key=lambda p: p.suffix == ".lock"):  # the held lock last
                _record(result, path, _remove(path))
    for path in found.logs:
        prebuild = _PREBUILD_LOGS.match(path.name)
        build = _BUILD_LOG.match(path.name)
        if prebuild and _prebuild_running(int(prebuild["pid"])):
            result.in_use.append((path, f"prebuild pid {prebuild['pid']} is running"))
        elif build and build["spec"] in busy_specs:
            result.in_use.append((path, f"a build of {build['spec']} is running"))
        else:
            _record(result, path, _remove(path))
    logs = root / LOGS
    try:
        if _is_dir(logs) and not any(logs.iterdir()):
            logs.rmdir()
    except OSError as err:
        result.failed.append((logs, err.strerror or str(err)))
    return result


def _record(result: ClearResult, path: Path, why_not: str | None) -> None:
    if why_not is None:
        result.removed += 1
    else:
        result.failed.append((path, why_not))
