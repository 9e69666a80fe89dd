"""Build the C kernels in corral/model/csrc/ with the system compiler, once per machine.

A library is compiled into cache_root()/kernels/<hash of source + compiler + flags + CPU>/ (the
flags include -march=native, so a cache shared between machines must not mix CPUs) and loaded
with ctypes, whose calls release the GIL. Callers warn and fall back to PyTorch on failure.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

# -fopenmp links the libgomp that torch already loaded: one OpenMP runtime in the process
BASE_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]


def find_compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def source(name: str) -> bytes:
    """The bytes of corral/model/csrc/<name>.c."""
    return resources.files("corral.model").joinpath(f"csrc/{name}.c").read_bytes()


def cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def build(name: str, cc: str | None, cflags: list[str], cache_dir: Path | None = None,
          deps: tuple[str, ...] = ()) -> tuple[Path | None, str]:
    """Compile csrc/<name>.c (or reuse the cached build): (path to the .so, "") or (None, why).
    `deps`: other csrc/ files it #includes (copied beside it, part of the cache key)."""
    from corral.loading import cache_root

    if cc is None:
        return None, "no C compiler (gcc/cc) found"
    src = source(name)
    dep_src = {dep: source(dep) for dep in deps}
    key = hashlib.sha256(src + b"".join(dep_src.values()) + " ".join([cc, *cflags]).encode()
                         + cpu_id().encode())
    out_dir = (cache_dir or cache_root() / "kernels") / key.hexdigest()[:16]
    lib = out_dir / f"{name}.so"
    if lib.is_file():
        return lib, ""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        c_file = Path(tmp) / f"{name}.c"
        c_file.write_bytes(src)
        for dep, text in dep_src.items():
            (Path(tmp) / f"{dep}.c").write_bytes(text)
        tmp_lib = Path(tmp) / f"{name}.so"
        try:
            proc = subprocess.run([cc, *cflags, "-o", str(tmp_lib), str(c_file)],
                                  capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{cc} failed: {e}"
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or [""])[0][:200]
            return None, f"{cc} failed: {first}"
        os.replace(tmp_lib, lib)  # atomic: concurrent builders write the same bytes
    return lib, ""


def load(path: Path) -> tuple[ctypes.CDLL | None, str]:
    """ctypes-load a built library: (lib, "") or (None, why)."""
    try:
        return ctypes.CDLL(str(path)), ""
    except OSError as e:
        return None, f"cannot load {path}: {e}"
