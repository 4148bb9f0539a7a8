"""An adapter directory's files: each resolved, confined and fingerprinted as it is read.

Every path (the directory, then each file) is resolved with its links followed before use. With
allowed roots, a resolved path outside all of them is refused (AdapterPathForbidden), whether or
not its target exists, so a link can neither load nor probe a file elsewhere. A file is read once,
into memory, and hashed (blake2b) from those bytes: the fingerprint costs no second read, and
what was checked is exactly what gets parsed. Given the fingerprint of the read that validated the
adapter, a re-read refuses any file that differs in size or hash, or that appeared or went away
(AdapterFilesChanged), before anything is parsed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from loramux.engine.errors import AdapterFilesChanged, AdapterLoadError, AdapterNotFound, \
    AdapterPathForbidden

logger = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_PROC_FD = Path("/proc/self/fd")


@dataclass(frozen=True)
class FileDigest:
    """What one read of one adapter file saw."""

    name: str  # relative to the adapter directory
    size: int
    blake2b: str


Fingerprint = tuple[FileDigest, ...]  # in the order the files were read


class AdapterFiles:
    """The files of the adapter directory `path`, read as described in the module docstring.

    allowed_roots: empty = no confinement. expected: the validating read's fingerprint (a
    re-read), or None (the first read). `fingerprint` lists every file read so far.
    """

    def __init__(self, name: str, path: str, allowed_roots: tuple[str, ...] = (),
                 expected: Fingerprint | None = None) -> None:
        self.name, self.path = name, path
        self.roots = tuple(os.path.realpath(root) for root in allowed_roots)
        self.expected = None if expected is None else {d.name: d for d in expected}
        self.fingerprint: Fingerprint = ()
        try:
            self.dir = Path(self._resolve(path, f"adapter path {path}"))
        except AdapterNotFound:
            self._changed_if_expected("the directory is gone")
            raise
        if not self.dir.is_dir():
            raise AdapterLoadError(f"adapter path {path} is not a directory")

    def exists(self, file_name: str) -> bool:
        """Whether the directory has an entry of that name (a dangling link counts)."""
        found = os.path.lexists(self.dir / file_name)
        if self.expected is not None and found != (file_name in self.expected):
            self._changed_if_expected(f"{file_name} {'appeared' if found else 'is gone'}")
        return found

    def read(self, file_name: str) -> bytes:
        """The file's bytes, after confinement; recorded in (and checked against) the fingerprint."""
        resolved = self._resolve(str(self.dir / file_name), file_name)
        try:
            fd = os.open(resolved, _OPEN_FLAGS)
        except OSError as err:
            raise AdapterLoadError(f"{file_name} cannot be opened: {err.strerror}") from err
        try:
            self._check_opened(fd, resolved, file_name)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise AdapterLoadError(f"{file_name} is not a regular file")
            handle = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            data = handle.read()
        digest = FileDigest(file_name, len(data), hashlib.blake2b(data).hexdigest())
        if self.expected is not None and self.expected.get(file_name) != digest:
            self._changed_if_expected(f"{file_name} differs in size or content")
        self.fingerprint += (digest,)
        return data

    def _resolve(self, path: str, what: str) -> str:
        """`path` with every link followed; refused outside the roots, missing or looping."""
        self._confine(os.path.realpath(path), what)
        try:
            return os.path.realpath(path, strict=True)
        except FileNotFoundError as err:
            raise AdapterNotFound(f"{what} does not exist") from err
        except OSError as err:  # ELOOP: a symbolic link loop; EACCES...
            raise AdapterLoadError(f"{what} cannot be resolved: {err.strerror}") from err

    def _confine(self, resolved: str, what: str) -> None:
        if self.roots and not any(os.path.commonpath((resolved, root)) == root
                                  for root in self.roots):
            raise AdapterPathForbidden(f"{what} resolves outside the directories adapters may "
                                       "be read from (--allowed-lora-roots, or the "
                                       "--lora-resolver-dir of adapters loaded by name)")

    def _check_opened(self, fd: int, resolved: str, what: str) -> None:
        """The opened file is the checked one (a directory swapped meanwhile is caught)."""
        link = _PROC_FD / str(fd)
        if self.roots and link.exists():
            opened = os.readlink(link)
            if opened != resolved:
                self._confine(opened, what)

    def _changed_if_expected(self, why: str) -> None:
        if self.expected is None:
            return
        logger.warning("adapter %s: files in %s changed on disk since it was loaded (%s); "
                       "its requests fail until it is reloaded", self.name, self.path, why)
        raise AdapterFilesChanged(f"adapter '{self.name}': its files changed on disk since it "
                                  f"was loaded ({why}); reload it")
