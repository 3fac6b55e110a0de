"""memopt's C kernels (`kivi_kernels.c`): built with the system's C compiler on first use, loaded with ctypes.

    lib = kernels()          # a ctypes.CDLL, or None: no compiler, a failed build, or MEMOPT_NATIVE=0
    lib.kivi_key_logits(...)

The shared library is cached under `$MEMOPT_CACHE` (default `$XDG_CACHE_HOME/memopt`, else `~/.cache/memopt`),
named by a hash of the source, the compiler command and the CPU's feature flags (the build targets this CPU:
`-march=native`), written to a temporary name and renamed, so concurrent builds do not see half a file. Any
failure leaves the callers on their PyTorch path (the same numbers, slower); `why_not()` says what failed.
The kernels are plain C over raw pointers: no Python, PyTorch headers or linking beyond libc.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("kivi_kernels.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
         "-fno-signed-zeros")  # reassociation: vectorized sums (the softmax handles -inf itself)
CPU_FLAGS = ("-march=native", "-mprefer-vector-width=512") if platform.machine().lower() in ("x86_64", "amd64") \
    else ("-mcpu=native",)  # this CPU's vectors (AVX-512 used at full width); dropped if the compiler refuses them
_LONG, _INT, _PTR = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
_SEGMENTS = ctypes.POINTER(ctypes.c_int64)
SIGNATURES = {
    "kivi_key_logits": [_INT] * 6 + [_PTR, _PTR, _LONG, _LONG, _PTR, _PTR, _LONG, _LONG, _PTR, _LONG, _LONG],
    "kivi_value_output": [_INT] * 6 + [_PTR, _LONG, _LONG, _PTR, _LONG, _PTR, _PTR, _LONG, _PTR],
    "dense_logits": [_INT] * 3 + [_PTR, _SEGMENTS, _INT, _PTR, _LONG, _LONG],
    "dense_output": [_INT] * 3 + [_PTR, _LONG, _LONG, _SEGMENTS, _INT, _PTR],
    "kivi_attend": [_INT] * 3 + [_PTR, _PTR, _INT, ctypes.c_float, _LONG, _LONG, _INT, _INT, _PTR, _LONG, _LONG, _PTR,
                                 _PTR, _LONG, _LONG, _INT, _INT, _INT, _PTR, _LONG, _PTR, _PTR, _LONG, _SEGMENTS, _INT,
                                 _SEGMENTS, _INT, _PTR, _PTR, _PTR, _PTR, _SEGMENTS, _INT],
    "kivi_key_logits_rope": [_INT] * 7 + [_PTR, _PTR, _LONG, _LONG, _PTR, _PTR, _LONG, _LONG, _PTR, _SEGMENTS, _PTR,
                                          _LONG, _LONG],
    "kivi_step": [_PTR, ctypes.c_double, _PTR, _PTR, _INT],
}
_LOCK = threading.Lock()
_STATE: dict = {}


def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, built on the first call (None when they cannot be had here; see `why_not`)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                try:
                    _STATE["lib"], _STATE["why"] = _load(), ""
                except (OSError, subprocess.SubprocessError, ValueError) as exc:
                    _STATE["lib"], _STATE["why"] = None, f"{type(exc).__name__}: {exc}"
    return _STATE["lib"]


def why_not() -> str:
    """Why `kernels()` returned None ("" when it did not, or was not called)."""
    return _STATE.get("why", "")


def _load() -> ctypes.CDLL:
    if os.environ.get("MEMOPT_NATIVE", "1") == "0":
        raise ValueError("MEMOPT_NATIVE=0 turns the C kernels off")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, *CPU_FLAGS, platform.machine(), _cpu_flags())).encode())
    target = _cache_dir() / f"kernels-{key.hexdigest()[:24]}.so"
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(target.parent)
    if target.exists():
        _check_private(target)
    else:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            for flags in ((*FLAGS, *CPU_FLAGS), FLAGS):
                out = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                     timeout=300, check=False)
                if not out.returncode:
                    break
            else:
                raise OSError(f"{compiler} failed: {out.stderr.strip()[-500:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    for name, args in SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = _INT
    return lib


def _check_private(path: Path) -> None:
    """Load a shared library only from where nobody else can write: the cache directory and the library must
    belong to this user and be writable by no one else (another user's file there would run as this one)."""
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(f"{path} belongs to another user; set MEMOPT_CACHE to a directory of your own")
    if st.st_mode & 0o022:
        raise OSError(f"{path} is writable by other users; make it private (chmod go-w) or set MEMOPT_CACHE")


def _cache_dir() -> Path:
    root = os.environ.get("MEMOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "memopt")
    return Path(root) / "kernels"


def _cpu_flags() -> str:
    """This CPU's feature flags (a build for it may not run on another)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
