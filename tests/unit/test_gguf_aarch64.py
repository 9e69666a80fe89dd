"""The GGUF kernels' aarch64 builds, checked on an x86 host: gguf_gemm.c and a small driver
(gguf_aarch64_driver.c) are cross-compiled static for aarch64 as the NEON variants (plain NEON,
NEON with sdot) and as the portable C build, run under qemu-aarch64 on inputs written here, and
their results compared with the x86 portable build's: the int8 path and the dequantized weights
bit for bit, the fp32 path bit for bit for the portable build and to 1e-5 for NEON (its fp32
dot products sum in another order). Plain NEON runs on an emulated Cortex-A53, which has no
sdot, so it cannot lean on that instruction.

Needs Debian's gcc-aarch64-linux-gnu and qemu-user (`make test` installs them when root)."""

from __future__ import annotations

import platform
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from corral.model import gguf_kernels as gk
from tests.unit.test_gguf_kernels import TYPE_NAMES, random_rows

CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
SRC = Path(gk.__file__).parent / "csrc" / "gguf_gemm.c"
DRIVER = Path(__file__).parent / "gguf_aarch64_driver.c"
# build -> (extra flags, qemu CPU, the isa the build reports)
BUILDS = {
    "neon": (gk.VARIANT_CFLAGS["neon"], "cortex-a53", "neon"),
    "neondot": (gk.VARIANT_CFLAGS["neondot"], "max", "neondot"),
    "portable": (["-march=armv8-a", "-DGGUF_PORTABLE"], "cortex-a53", "portable"),
}
# M: 1-3 tokens (decode tiles), 4 (a full tile), 9 (tiles and a remainder); N = 19: a partial tile
CASES = [(kind, m) for kind in TYPE_NAMES for m in (1, 3, 4, 9)]
N, K = 19, 512

pytestmark = [
    pytest.mark.skipif(platform.machine().lower() in ("aarch64", "arm64"),
                       reason="an aarch64 host tests its NEON variants natively "
                              "(test_gguf_kernels.py)"),
    pytest.mark.skipif(CC is None or QEMU is None,
                       reason="no aarch64 cross toolchain (Debian's gcc-aarch64-linux-gnu and "
                              "qemu-user; `make test` installs them as root)"),
]


def case_inputs() -> list[tuple[str, np.ndarray, torch.Tensor]]:
    out = []
    for i, (kind, m) in enumerate(CASES):
        rows = random_rows(kind, N, K, seed=100 + i)
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(i))
        x[0, 3] = 30.0  # an outlier in one activation block
        out.append((kind, rows, x))
    return out


@pytest.fixture(scope="module")
def cases():
    return case_inputs()


@pytest.fixture(scope="module")
def arm_results(tmp_path_factory, cases):
    """build -> (isa, [(rc, y_int, y_fp32, dequantized) per case]) from qemu-aarch64."""
    tmp = tmp_path_factory.mktemp("aarch64")
    blob = bytearray(struct.pack("<i", len(cases)))
    for kind, rows, x in cases:
        blob += struct.pack("<5i", gk.TYPE_IDS[kind], x.shape[0], K, N, rows.shape[1])
        blob += rows.tobytes() + x.numpy().astype("<f4").tobytes()
    (tmp / "in.bin").write_bytes(bytes(blob))
    results = {}
    for name, (flags, cpu, _) in BUILDS.items():
        exe = tmp / f"drv-{name}"
        subprocess.run([CC, "-O3", "-ffp-contract=off", "-static", *flags, "-o", str(exe),
                        str(DRIVER), str(SRC)], check=True, capture_output=True, timeout=300)
        out = tmp / f"out-{name}.bin"
        proc = subprocess.run([QEMU, "-cpu", cpu, str(exe), str(tmp / "in.bin"), str(out)],
                              capture_output=True, text=True, timeout=300, check=True)
        data, at, per_case = out.read_bytes(), 0, []
        for _, _, x in cases:
            m = x.shape[0]
            rc = struct.unpack_from("<3i", data, at)
            at += 12
            arrays = []
            for count, shape in ((m * N, (m, N)), (m * N, (m, N)), (N * K, (N, K))):
                arrays.append(torch.from_numpy(np.frombuffer(data, "<f4", count, at).copy()
                                               .reshape(shape)))
                at += 4 * count
            per_case.append((rc, *arrays))
        assert at == len(data)
        results[name] = (proc.stdout.strip(), per_case)
    return results


@pytest.fixture(scope="module")
def x86_portable():
    lib = gk.load_library("portable")
    assert lib is not None
    return lib


@pytest.mark.parametrize("build", list(BUILDS))
def test_aarch64_build_matches_x86_portable(arm_results, cases, x86_portable, build):
    isa, per_case = arm_results[build]
    assert isa == BUILDS[build][2]
    for (kind, rows, x), (rc, y_int, y_fp32, deq) in zip(cases, per_case):
        w = gk.PackedWeight.from_rows(kind, rows)
        where = f"{build} {kind} M={x.shape[0]}"
        assert rc[1:] == (0, 0), where
        assert torch.equal(deq, gk.gguf_dequantize(x86_portable, w)), where
        ref_fp32 = gk.gguf_matmul(x86_portable, x, w, 1)
        if build == "portable":
            assert torch.equal(y_fp32, ref_fp32), where
        else:
            torch.testing.assert_close(y_fp32, ref_fp32, rtol=1e-5, atol=1e-5 * K ** 0.5)
        if w.int_path():
            assert rc[0] == 0, where
            assert torch.equal(y_int, gk.gguf_matmul(x86_portable, x, w, 1, math="int8")), where
        else:
            assert rc[0] == -1, where  # F32/F16/BF16: no integer path

