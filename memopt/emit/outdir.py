"""Writing an output directory without ever losing data.

`-o DIR` is checked before any work (`check_output`): DIR must not be the working directory or one of
its parents, nor a regular file, and an existing non-empty DIR must be a memopt artifact unless
`force`. The new artifact is built in a temporary sibling and swapped in with one `renameat2(...,
RENAME_EXCHANGE)` (Linux): at every instant DIR holds either the old artifact or the new one, and two
writers racing on DIR each swap atomically. Where the exchange is not available, two renames are used
and an interrupted swap is repaired on the next write or load (`recover`). Temporary and old
directories left by a killed process (`.DIR.tmp-PID-*`, `.DIR.old-PID-*`, the PID no longer running)
are removed on the next write.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "memopt-artifact"
_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class OutputError(ValueError):
    """An output directory memopt will not write; the message says why and what to do."""


def is_artifact(directory: Path) -> bool:
    """`directory` holds a manifest written by memopt."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_output(directory: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an `-o` that would destroy data or cannot be written, before any expensive work."""
    raw = directory
    directory = Path(directory)
    if str(raw).strip() == "":
        raise OutputError("output directory is empty; pass -o DIR")
    resolved = directory.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"-o {str(raw)!r} is the current directory or one of its parents; name a new directory, "
                          "e.g. -o out")
    recover(resolved)
    if resolved.exists() or resolved.is_symlink():
        if directory.is_symlink():
            raise OutputError(f"-o {str(raw)!r} is a symbolic link; name the real directory")
        if not resolved.is_dir():
            raise OutputError(f"-o {str(raw)!r} exists and is not a directory; choose another -o")
        if any(resolved.iterdir()) and not is_artifact(resolved) and not force:
            raise OutputError(f"-o {str(raw)!r} is an existing directory that is not a memopt artifact; choose a new "
                              "directory, or pass --force to replace it")
    parent = resolved.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise OutputError(f"cannot write -o {str(raw)!r}: {str(p)!r} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise OutputError(f"cannot write -o {str(raw)!r}: {str(p)!r} is not writable (read-only file system "
                                  "or permissions); choose another -o")
            break
    return resolved


def new_tmp(directory: Path) -> Path:
    """A fresh temporary sibling of `directory`, named after this process."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-", dir=directory.parent))
    tmp.chmod(0o755)
    return tmp


def swap_in(tmp: Path, directory: Path) -> None:
    """Put the complete directory `tmp` at `directory`; whatever was there is removed afterwards."""
    for _ in range(3):
        if not directory.exists():
            try:
                os.rename(tmp, directory)  # fails if another writer created `directory` meanwhile
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        if _exchange(tmp, directory):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old artifact
            return
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}-{tmp.name.rsplit('-', 1)[-1]}")
            os.rename(directory, old)  # a crash here leaves `old` complete; recover() puts it back
            try:
                os.rename(tmp, directory)
            except OSError:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
    raise OutputError(f"could not replace {str(directory)!r}: other writers kept changing it; try again")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, os.strerror(err), str(b))


def recover(directory: Path) -> str | None:
    """If a two-rename swap was interrupted (DIR gone, a complete `.DIR.old-*` beside it), put it back."""
    directory = Path(directory)
    if directory.exists() or not directory.parent.is_dir():
        return None
    for old in sorted(directory.parent.glob(f".{directory.name}.old-*")):
        if old.is_dir() and is_artifact(old):
            os.rename(old, directory)
            return f"restored {directory} from an interrupted write ({old.name})"
    return None


def clean_stale(directory: Path) -> list[str]:
    """Remove `.DIR.tmp-PID-*` / `.DIR.old-PID-*` siblings whose process is gone; the names removed."""
    removed = []
    for kind in ("tmp", "old"):
        for p in directory.parent.glob(f".{directory.name}.{kind}-*"):
            pid = p.name[len(f".{directory.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_space(directory: Path, need_bytes: int) -> None:
    """Refuse before writing when the file system lacks `need_bytes` (plus 5% and 1 MiB) beside `directory`."""
    try:
        free = shutil.disk_usage(directory.parent).free
    except OSError:
        return
    if free < need_bytes * 1.05 + (1 << 20):
        from memopt.frontend.units import fmt_bytes

        raise OutputError(f"not enough disk space for {str(directory)!r}: the artifact needs about "
                          f"{fmt_bytes(need_bytes)}, {fmt_bytes(free)} free; free some space or choose another -o")


def write_error(exc: BaseException, directory: Path) -> OutputError | None:
    """A one-line OutputError for a failed write (disk full, file too large, read-only, permissions)."""
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code in _SPACE_ERRNOS or "No space left" in text or "File too large" in text or "Disk quota" in text:
        why = os.strerror(code) if code in _SPACE_ERRNOS else text.strip().splitlines()[0][:120]
        return OutputError(f"writing {str(directory)!r} failed: {why} (the disk or your file-size limit is full); "
                           "free some space or choose another -o — nothing was written")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"cannot write {str(directory)!r}: {os.strerror(code)}; choose another -o")
    return None
