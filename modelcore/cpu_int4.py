"""Our own CPU kernels (modelcore/csrc: int4/int8 matmuls, the fused decode step): build, load, pack weights, call them.

The C files are compiled on first use with the machine's C compiler for the machine's own instruction set
(`-march=native`: AVX512-VNNI, else AVX2, else plain C) into a per-user cache folder
(`MODELCORE_KERNEL_DIR`, default ~/.cache/modelcore/kernels), keyed by the source, the flags and the CPU, and
loaded with ctypes; `./kd install` builds it once. Where no compiler works, `library()` returns None and the
int4 layers keep torch's packed kernel (`MODELCORE_CPU_INT4=0` asks for that too).

Layout (see the C file): rows in blocks of 16, stored as `blocks` (N, K/2) uint8 and `block_scales` (N, 2G)
bfloat16 whose rows 16b..16b+15 are block b's bytes, so quantized linears concatenate along rows with torch.cat.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "int4_cpu.c", CSRC / "decode_cpu.c")  # the matmuls; the fused decode step (cpu_decode.py)
HEADERS = (CSRC / "kernels.h",)
ROWS, CHUNK = 16, 32
ISAS = ("native", "x86-64-v3", "x86-64")  # -march values: this CPU; AVX2+FMA; baseline (the plain C path)
EXACT = "exact"  # a test build: float activations and weights dequantized one by one (the C path's naive twin)


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("MODELCORE_KERNEL_DIR") or Path.home() / ".cache" / "modelcore" / "kernels")


def build(isa: str = "native") -> Path:
    """Compile the kernel for `isa` (a -march value) unless a build for this source, flags and CPU exists."""
    if isa not in (*ISAS, EXACT):
        raise ValueError(f"isa must be one of {ISAS} or {EXACT!r}, got {isa!r}")
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    march = ["-march=native", "-DMC_EXACT"] if isa == EXACT else [f"-march={isa}"]
    flags = ["-O3", *march, "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11"]  # no errno: expf vectorizes
    code = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    key = hashlib.sha256(code + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"int4_cpu-{isa}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # build aside, then rename: concurrent builders never see half a file
        tmp_out = Path(tmp) / out.name
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(tmp_out), "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {', '.join(f.name for f in SOURCES)} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp_out, out)
    return out


class Kernel:
    """The loaded library: `matmul(x, blocks, block_scales, group)` and the instruction set it was built for."""

    def __init__(self, path: Path) -> None:
        import torch  # noqa: F401  (torch's libgomp must be loaded first, so the kernel shares its OpenMP runtime)
        self.lib = ctypes.CDLL(str(path))
        self.lib.mc_int4_isa.restype = ctypes.c_char_p
        fn = self.lib.mc_int4_matmul
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
        self._fn = fn
        fn8 = self.lib.mc_int8_matmul
        fn8.restype = ctypes.c_int
        fn8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                        ctypes.c_void_p, ctypes.c_int]
        self._fn8 = fn8
        fn8b = self.lib.mc_int8b_matmul
        fn8b.restype = ctypes.c_int
        fn8b.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                         ctypes.c_void_p, ctypes.c_int]
        self._fn8b = fn8b
        deq = self.lib.mc_int4_dequant_bf16
        deq.restype = ctypes.c_int
        deq.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                        ctypes.c_int]
        self._deq = deq
        self.isa = self.lib.mc_int4_isa().decode()

    def dequantize_bf16(self, blocks: torch.Tensor, block_scales: torch.Tensor, group: int,
                        threads: int | None = None) -> torch.Tensor:
        """The (N, K) bfloat16 weight of a packed int4 layer: (code - 8) * scale + zero, rounded to nearest even."""
        n, k = blocks.shape[0], blocks.shape[1] * 2
        out = torch.empty(n, k, dtype=torch.bfloat16)
        rc = self._deq(blocks.data_ptr(), block_scales.data_ptr(), n, k, group, out.data_ptr(), threads or torch.get_num_threads())
        if rc:
            raise ValueError(f"int4 dequantize refused shapes N={n} K={k} group={group} (code {rc})")
        return out

    def int8_matmul(self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """x (M, K) float32 contiguous CPU, weight (N, K) int8 row-major, scales (N,) float32 -> (M, N) float32."""
        assert weight.dtype == torch.int8
        return self._int8_call(self._fn8, "int8 kernel", x, weight, scales, threads)

    @property
    def int8_blocked(self) -> bool:
        """Whether this build has the block-layout int8 kernel (AVX512-VNNI; see int8_blocked_matmul)."""
        return self.isa == "avx512vnni"

    def int8_blocked_matmul(self, x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor,
                            threads: int | None = None) -> torch.Tensor:
        """x (M, K) float32 contiguous CPU, blocks from pack_int8_blocks (N, K) uint8, scales (N,) float32 -> (M, N)
        float32: the same products as int8_matmul's per-chunk path, 16 output rows per vector (int4_cpu.c)."""
        assert blocks.dtype == torch.uint8
        return self._int8_call(self._fn8b, "int8 block kernel", x, blocks, scales, threads)

    def _int8_call(self, fn, what: str, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                   threads: int | None) -> torch.Tensor:
        """Check the shapes, run an int8 matmul entry point of the library, map its error codes."""
        assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2, "x must be a contiguous (M, K) float32 tensor"
        assert weight.is_contiguous() and scales.dtype == torch.float32 and scales.is_contiguous()
        m, k = x.shape
        n = weight.shape[0]
        if weight.shape[1] != k or scales.shape != (n,):
            raise ValueError(f"{what}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, scales {tuple(scales.shape)}")
        y = torch.empty(m, n, dtype=torch.float32)
        rc = fn(x.data_ptr(), m, k, n, weight.data_ptr(), scales.data_ptr(), y.data_ptr(), threads or torch.get_num_threads())
        if rc == 3:
            raise RuntimeError(f"this build ({self.isa}) has no {what}")
        if rc:
            raise ValueError(f"{what} refused shapes M={m} K={k} N={n} (code {rc})")
        return y

    def matmul(self, x: torch.Tensor, blocks: torch.Tensor, block_scales: torch.Tensor, group: int,
               threads: int | None = None) -> torch.Tensor:
        """x (M, K) float32 contiguous CPU -> (M, N) float32."""
        assert x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2, "x must be a contiguous (M, K) float32 tensor"
        m, k = x.shape
        n = blocks.shape[0]
        assert blocks.shape[1] * 2 == k and blocks.dtype == torch.uint8, "blocks must be (N, K/2) uint8"
        y = torch.empty(m, n, dtype=torch.float32)
        rc = self._fn(x.data_ptr(), m, k, n, blocks.data_ptr(), block_scales.data_ptr(), group, y.data_ptr(),
                      threads or torch.get_num_threads())
        if rc:
            raise ValueError(f"int4 kernel refused shapes M={m} K={k} N={n} group={group} (code {rc})")
        return y


@functools.lru_cache(maxsize=None)
def load(isa: str = "native") -> Kernel:
    """Build (if needed) and load the kernel for `isa`; raises RuntimeError when it cannot be built."""
    return Kernel(build(isa))


@functools.lru_cache(maxsize=None)
def library() -> Kernel | None:
    """The kernel for this CPU, or None (disabled by MODELCORE_CPU_INT4=0, or no compiler; logged once)."""
    if os.environ.get("MODELCORE_CPU_INT4", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return None  # the plain C path works anywhere but is slower than torch's own kernels there
    try:
        return load("native")
    except (RuntimeError, OSError) as exc:
        log.warning("modelcore: own CPU int4 kernel unavailable, using torch's packed kernel: %s", exc)
        return None


def supports(n: int, k: int, group: int) -> bool:
    """Whether a (N, K) weight with this group size fits the layout."""
    return n % ROWS == 0 and k % CHUNK == 0 and group % CHUNK == 0 and k % group == 0


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, K) uint8 0..15, scales and zeros (N, G) -> (blocks (N, K/2) uint8, block_scales (N, 2G) bf16)."""
    n, k = codes.shape
    g = scales.shape[1]
    c6 = codes.reshape(n // ROWS, ROWS, k // CHUNK, 4, 2, 4)  # (block, row, chunk, v, lo/hi, j): column 8v + 4h + j
    c6 = c6.permute(0, 2, 3, 1, 5, 4)  # (block, chunk, v, row, j, lo/hi)
    blocks = (c6[..., 0] | (c6[..., 1] << 4)).contiguous().view(n, k // 2)
    sz = torch.stack([scales.float(), zeros.float()], dim=1).to(torch.bfloat16)  # (N, 2, G)
    sz = sz.view(n // ROWS, ROWS, 2, g).permute(0, 3, 2, 1)  # (block, group, scale/zero, row)
    return blocks, sz.contiguous().view(n, 2 * g)


def pack_int8_blocks(q: torch.Tensor) -> torch.Tensor:
    """int8 weight (N, K) row-major -> the block layout of mc_int8b_matmul, (N, K) uint8: per block of 16 rows and
    chunk of 32 columns, 8 vectors of 64 bytes, byte 4r + j of vector v = row r's weight at column 4v + j, + 128."""
    n, k = q.shape
    if n % ROWS or k % CHUNK:
        raise ValueError(f"int8 block layout needs N % {ROWS} == 0 and K % {CHUNK} == 0, got ({n}, {k})")
    b = q.reshape(n // ROWS, ROWS, k // CHUNK, 8, 4).permute(0, 2, 3, 1, 4)  # (block, chunk, v, row, j)
    return (b.to(torch.int16) + 128).to(torch.uint8).contiguous().view(n, k)


def unpack_rows(blocks: torch.Tensor, block_scales: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (T, K) uint8, scales (T, G) float32, zeros (T, G) float32) of rows `ids` (1-D), read back exactly."""
    n, half = blocks.shape
    k, g = 2 * half, block_scales.shape[1] // 2
    b, r = ids // ROWS, ids % ROWS
    by = blocks.view(n // ROWS, k // CHUNK, 4, ROWS, 4)[b, :, :, r, :]  # (T, chunk, v, j)
    codes = torch.stack([by & 0x0F, by >> 4], dim=-2).reshape(-1, k)  # (T, chunk, v, lo/hi, j) -> (T, K)
    sz = block_scales.view(n // ROWS, g, 2, ROWS)[b, :, :, r].float()  # (T, G, 2)
    return codes, sz[..., 0], sz[..., 1]
