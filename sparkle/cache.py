"""The one on-disk store: a cache directory, atomic writes, locked JSON documents with versioned names.

Everything Sparkle keeps between processes (OpenCL program binaries, the tuning database) lives
under :func:`cache_dir`. Writers go through a temporary file and ``os.replace``, so a reader sees
the old file or the new one, never half of one; JSON updates hold a file lock across read-modify-write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import platformdirs
from filelock import FileLock

CACHE_ENV = "SPARKLE_CACHE_DIR"


# (SPARKLE_CACHE_DIR, XDG_CACHE_HOME, HOME) -> the directory they give, made once: a tuning lookup on every
# explicit-device call asks for it, and resolving and making it again cost ~40 us a call. Writers make their
# parent directory anyway (atomic_write_bytes), so one removed after this stays harmless.
_resolved = {}


def cache_dir():
    """``$SPARKLE_CACHE_DIR`` if set, else the user cache directory for Sparkle (created on demand)."""
    environ = os.environ
    key = (environ.get(CACHE_ENV), environ.get("XDG_CACHE_HOME"), environ.get("HOME"))
    path = _resolved.get(key)
    if path is None:
        path = Path(key[0] or platformdirs.user_cache_dir("sparkle", appauthor=False))
        path.mkdir(parents=True, exist_ok=True)
        _resolved[key] = path
    return path


def digest(*parts):
    """A stable hex key for text parts (source, options, device identity, ...)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_bytes(path):
    try:
        return Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None


class JsonDocument:
    """A JSON object stored as ``<cache_dir>/<name>-v<version>.json``.

    The version is part of the file name: a new layout starts a new file instead of misreading an old one.
    """

    def __init__(self, name, version, directory=None):
        self.directory = Path(directory) if directory is not None else None
        self.name = f"{name}-v{version}.json"
        self._snapshot, self._snapshot_key = {}, None

    @property
    def path(self):
        return (self.directory or cache_dir()) / self.name

    def _lock(self):
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock", timeout=60)

    def load(self):
        """The stored object, or {} if there is none; an unreadable file is reported and treated as empty."""
        data = read_bytes(self.path)
        if data is None:
            return {}
        try:
            value = json.loads(data)
            if not isinstance(value, dict):
                raise ValueError("top level is not an object")
            return value
        except ValueError as error:
            warnings.warn(f"ignoring unreadable Sparkle cache file {self.path}: {error}", RuntimeWarning,
                          stacklevel=2)
            return {}

    def snapshot(self):
        """Like :meth:`load`, but parsed once per version of the file (keyed by its inode, size and mtime).

        For hot read paths; the result is shared, so callers must not modify it.
        """
        try:
            stat = self.path.stat()
            key = (str(self.path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            return {}
        if self._snapshot_key != key:
            self._snapshot, self._snapshot_key = self.load(), key
        return self._snapshot

    def update(self, change):
        """Apply ``change(document)`` (mutating it in place) under the lock, then write atomically."""
        with self._lock():
            document = self.load()
            change(document)
            atomic_write_bytes(self.path, json.dumps(document, indent=1, sort_keys=True).encode())
            return document
