"""Build the MSDeformAttn CUDA extension (no GPU needed, only nvcc).

    python -m models.ops.ms_deform_attn.build [--out-dir DIR] [--build-dir DIR]

The shared library goes into this package's directory by default (`_C.<abi>.so`, git-ignored),
where `extension.get_extension()` finds it; intermediate files go into `build/` beside it.

- CUDA_HOME (or CUDA_PATH): the toolkit root. When unset it is derived from the `nvcc` on PATH,
  resolving symlinks and wrapper scripts (`nvcc -dryrun` reports the toolkit root).
- TORCH_CUDA_ARCH_LIST: the archs to build for, e.g. "8.0;9.0". When unset, the visible GPUs'
  archs; with no GPU visible, DEFAULT_ARCH_LIST below. (The build takes 20-40 s on 2 cores,
  about the same for one arch as for the default five: the C++ binding file dominates.)
- The CUDA headers of the pip wheels (site-packages/nvidia/cu<major>/include) are searched after
  the toolkit's, for toolkits installed without the library headers.
"""
import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from .extension import BUILD_COMMAND, EXTENSION_NAME, PACKAGE_DIR

SOURCES = [PACKAGE_DIR / "src" / "ms_deform_attn.cpp", PACKAGE_DIR / "src" / "ms_deform_attn_cuda.cu"]
# Used only when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a login node, CI): T4/RTX 20xx,
# A100, RTX 30xx/A6000, L40/RTX 40xx, H100, plus PTX that newer GPUs (Blackwell) compile when the
# extension first runs. (CUDA 13 starts at 7.5; a V100 needs a CUDA 12 build and
# TORCH_CUDA_ARCH_LIST=7.0.)
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


class BuildError(RuntimeError):
    """Something the build needs is missing; the message says what."""


def _is_toolkit_root(path):
    return path is not None and (Path(path) / "bin" / "nvcc").is_file() and \
        (Path(path) / "include" / "cuda_runtime.h").is_file()


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH if set, else derived from `nvcc` on PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            if not _is_toolkit_root(os.environ[var]):
                raise BuildError(f"{var}={os.environ[var]} is not a CUDA toolkit root "
                                 "(expected bin/nvcc and include/cuda_runtime.h in it)")
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if _is_toolkit_root("/usr/local/cuda"):
            return "/usr/local/cuda"
        raise BuildError("nvcc not found: install the CUDA toolkit (release "
                         f"{torch.version.cuda} to match torch) and put its bin/ on PATH, "
                         "or set CUDA_HOME to the toolkit root")
    candidates = [Path(nvcc).resolve().parent.parent]
    # `nvcc` may be a wrapper script (e.g. /usr/local/bin/nvcc running the real one); its dry run
    # prints the real toolkit root as "#$ TOP=...".
    try:
        dry_run = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
        top = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
        if top:
            candidates.append(Path(top.group(1).strip()).resolve())
    except (OSError, subprocess.SubprocessError):
        pass
    for root in candidates:
        if _is_toolkit_root(root):
            return str(root)
    raise BuildError(f"cannot find the CUDA toolkit root of {nvcc} (tried "
                     f"{', '.join(map(str, candidates))}); set CUDA_HOME to it")


def wheel_include_dirs():
    """Include dirs of the pip-installed CUDA headers matching torch's CUDA major version."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or torch.version.cuda is None:
        return []
    major = torch.version.cuda.split(".")[0]
    dirs = (Path(p) / f"cu{major}" / "include" for p in spec.submodule_search_locations or [])
    return [str(d) for d in dirs if d.is_dir()]


def resolve_arch_list():
    """TORCH_CUDA_ARCH_LIST for the build, or None to let torch use the visible GPUs' archs."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return archs
    if torch.cuda.is_available():
        return None
    if archs == "native":
        raise BuildError("TORCH_CUDA_ARCH_LIST=native but no GPU is visible; name the archs, "
                         "e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0'")
    print(f"TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: building for the default "
          f"'{DEFAULT_ARCH_LIST}' (set TORCH_CUDA_ARCH_LIST to choose)", file=sys.stderr)
    return DEFAULT_ARCH_LIST


@contextlib.contextmanager
def _environment(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def build(out_dir=PACKAGE_DIR, build_dir=None):
    """Compile the extension into `out_dir`; returns the path of the shared library."""
    if torch.version.cuda is None:
        raise BuildError(f"torch {torch.__version__} is a CPU-only build; the extension needs a "
                         "CUDA build of torch")
    cuda_home = find_cuda_home()
    arch_list = resolve_arch_list()
    out_dir = Path(out_dir)
    build_dir = Path(build_dir) if build_dir is not None else PACKAGE_DIR / "build"
    with _environment(CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST=arch_list):
        from setuptools import Distribution
        from torch.utils import cpp_extension

        # cpp_extension guessed CUDA_HOME when it was first imported; use the root found above.
        cpp_extension.CUDA_HOME = cuda_home
        ext = cpp_extension.CUDAExtension(
            name=EXTENSION_NAME, sources=[str(s) for s in SOURCES],
            extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]})
        ext.include_dirs += wheel_include_dirs()  # after torch's and the toolkit's own
        use_ninja = shutil.which("ninja") is not None
        dist = Distribution({
            "name": "ms_deform_attn", "ext_modules": [ext],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)},
        })
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib, cmd.build_temp, cmd.inplace = str(out_dir), str(build_dir), False
        dist.run_command("build_ext")
        return Path(cmd.get_ext_fullpath(EXTENSION_NAME))


def main(argv=None):
    parser = argparse.ArgumentParser(prog=BUILD_COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=PACKAGE_DIR,
                        help="where the shared library goes (default: the package directory, "
                             "where the loader looks)")
    parser.add_argument("--build-dir", type=Path, default=None,
                        help="intermediate files (default: build/ in the package directory)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build(args.out_dir, args.build_dir)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {path} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
