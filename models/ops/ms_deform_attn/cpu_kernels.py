"""The CPU kernels (src/ms_deform_attn_cpu.cpp): compiled on first use, loaded with ctypes.

The library is plain C++ without torch headers, so any C++17 compiler builds it in a few seconds
and it does not depend on the torch build. It is compiled the first time a CPU tensor reaches the
op, into build/cpu/ beside this file (or a temporary directory when that is not writable), under a
name that hashes the sources, the compiler, its flags and, on x86 Linux, the CPU's feature list: a
changed source is rebuilt, an unchanged one is loaded again. On x86 Linux it is compiled for the
CPU it runs on (-march=native: with AVX2 the op's forward and backward took 0.6-0.8x the time of an
SSE2 build on this repository's test machine), and a cluster's nodes of other CPU kinds each get their
own library. The library is written under a temporary name and renamed, so processes that start
together (DDP ranks, pytest workers) never load a half-written file.

`MSDA_CPU_KERNELS=0` in the environment turns the kernels off (the op then takes the PyTorch path
for CPU tensors); `CXX` names the compiler (default: c++, else g++). Any failure (no compiler, a
compile error) is recorded rather than raised, and the op falls back to the PyTorch path.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCES = [PACKAGE_DIR / "src" / "ms_deform_attn_cpu.cpp", PACKAGE_DIR / "src" / "footprint.h"]
FLAGS = ["-std=c++17", "-O3", "-fopenmp-simd", "-shared", "-fPIC", "-pthread"]
NATIVE_FLAGS = ["-march=native"]  # where cpu_features() tells CPU kinds apart
ENV_SWITCH = "MSDA_CPU_KERNELS"
_SUFFIXES = {torch.float32: "f32", torch.float64: "f64"}  # of the entry points, by dtype

_kernels = None
_load_error = None
_tried = False


def switched_off():
    """True when the environment turns the CPU kernels off (MSDA_CPU_KERNELS=0)."""
    return os.environ.get(ENV_SWITCH, "").strip() == "0"


def _compiler():
    name = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not name:
        raise OSError("no C++ compiler found (set CXX, or install g++)")
    path = shutil.which(name)
    if path is None:
        raise OSError(f"C++ compiler {name!r} (from CXX) not found")
    return path


def cpu_features():
    """The CPU's feature list ("flags" of /proc/cpuinfo, x86 Linux), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def compile_flags():
    """FLAGS, plus NATIVE_FLAGS where the CPU's features are known."""
    return FLAGS + NATIVE_FLAGS if cpu_features() else list(FLAGS)


def library_name(compiler):
    """File name of the library built from the current sources with `compiler` and
    compile_flags() for this CPU."""
    digest = hashlib.sha256()
    for part in [compiler, *compile_flags(), cpu_features()]:
        digest.update(part.encode() + b"\0")
    for source in SOURCES:
        digest.update(source.read_bytes())
    return f"msda_cpu-{digest.hexdigest()[:16]}.so"


def _cache_dirs():
    yield PACKAGE_DIR / "build" / "cpu"
    yield Path(tempfile.gettempdir()) / f"ks_detr-msda-cpu-{os.getuid()}"


def compile_library(out_dir, compiler=None):
    """Compile the kernels into `out_dir` unless the library for the current sources is already
    there; returns its path. Raises OSError or RuntimeError (the compiler's message) on failure."""
    compiler = compiler or _compiler()
    out_dir = Path(out_dir)
    path = out_dir / library_name(compiler)
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + "-", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        start = time.perf_counter()
        proc = subprocess.run([compiler, *compile_flags(), str(SOURCES[0]), "-o", tmp],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCES[0].name}: "
                               f"{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"MSDeformAttn: compiled the CPU kernels into {path} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return path


class CPUKernels:
    """forward/backward on contiguous CPU tensors of one dtype (float32 or float64), with the
    interface of the CUDA extension (models/ops/ms_deform_attn/src/ms_deform_attn.cpp)."""

    def __init__(self, path):
        self.path = Path(path)
        lib = ctypes.CDLL(str(path))
        pointers, sizes = [ctypes.c_void_p] * 5, [ctypes.c_int64] * 7 + [ctypes.c_int]
        self._forward, self._backward = {}, {}
        for suffix in _SUFFIXES.values():
            forward = getattr(lib, f"msda_cpu_forward_{suffix}")
            forward.argtypes, forward.restype = pointers + [ctypes.c_void_p] + sizes, None
            backward = getattr(lib, f"msda_cpu_backward_{suffix}")
            backward.argtypes, backward.restype = pointers + [ctypes.c_void_p] * 4 + sizes, None
            self._forward[suffix], self._backward[suffix] = forward, backward

    @staticmethod
    def _sizes(value, sampling_locations):
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = sampling_locations.shape
        return [N, S, M, D, Lq, L, P, torch.get_num_threads()]

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        N, _, M, D = value.shape
        output = value.new_empty(N, sampling_locations.shape[1], M * D)
        tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        self._forward[_SUFFIXES[value.dtype]](*(t.data_ptr() for t in tensors),
                                                 output.data_ptr(),
                                                 *self._sizes(value, sampling_locations))
        return output

    def backward(self, value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, grad_output):
        """(grad_value, grad_sampling_locations, grad_attention_weights)."""
        grad_value = torch.zeros_like(value)  # accumulated; the other two are overwritten
        grad_locations = torch.empty_like(sampling_locations)
        grad_weights = torch.empty_like(attention_weights)
        tensors = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   grad_output, grad_value, grad_locations, grad_weights)
        self._backward[_SUFFIXES[value.dtype]](*(t.data_ptr() for t in tensors),
                                                  *self._sizes(value, sampling_locations))
        return grad_value, grad_locations, grad_weights


def get_cpu_kernels():
    """The CPU kernels, compiled and loaded on the first call; None when they are switched off or
    cannot be built (see `cpu_kernels_load_error`)."""
    global _kernels, _load_error, _tried
    if not _tried:
        _tried = True
        if switched_off():
            _load_error = f"switched off by {ENV_SWITCH}=0"
            return None
        errors = []
        try:
            compiler = _compiler()
        except OSError as exc:
            _load_error = str(exc)
            return None
        for out_dir in _cache_dirs():
            try:
                _kernels = CPUKernels(compile_library(out_dir, compiler))
                break
            except PermissionError as exc:  # a read-only install: try the next directory
                errors.append(f"{out_dir}: {exc}")
            except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                break
        if _kernels is None:
            _load_error = "; ".join(errors)
    return _kernels


def cpu_kernels_load_error():
    """Why the CPU kernels are not used, or None."""
    get_cpu_kernels()
    return _load_error
