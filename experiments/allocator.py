"""glibc's malloc in CPU training: freed memory kept for the next step.

A training step allocates and frees the same large tensors every step. By default glibc's malloc
serves blocks above its mmap threshold from fresh mappings that it unmaps when they are freed, and
gives memory at the top of its heap back to the system once more than its trim threshold is free
(both thresholds follow the largest block freed so far, up to 32 and 64 MiB; a block above 32 MiB
is always a fresh mapping). Either way the next step touches new pages, and the first touch of
each page is a page fault that zeroes it. KS-Deformable-DETR training steps at 2 x 256 px
re-faulted 24,000-114,000 pages (up to 440 MB) per step, 50-250 ms of system time in a 3.3 s step
and up to a second in single steps; how much depends on the order in which a process happens to
free its blocks (benchmarks/allocator.py measures it).

`keep_freed_memory()` turns glibc's per-block mappings off and its trim threshold out of reach, so
every block comes from the heap and the heap is never given back: the process keeps the resident
size of its largest step, which it reaches every step anyway. The training engine sets it for CPU
runs, and benchmarks/ks_overhead.py for the CPU steps it times. Elsewhere than glibc
(musl, macOS, Windows) it does nothing; MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_,
MALLOC_MMAP_MAX_ or GLIBC_TUNABLES in the environment (the user's own choice) or
KS_KEEP_FREED_MEMORY=0 leave the allocator as it is.
"""
import ctypes
import os
import platform

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: 2 GiB free at the heap's top before it trims
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")
SWITCH = "KS_KEEP_FREED_MEMORY"

_state = None  # what the first call found: "kept", or why not


def keep_freed_memory(environ=None):
    """Keeps freed memory in this process (see the module). Returns "kept" or why it left the
    allocator alone; only the first call acts, later calls return its answer."""
    global _state
    if _state is None:
        _state = _apply(os.environ if environ is None else environ)
    return _state


def _apply(environ):
    if environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    chosen = [name for name in USER_SETTINGS if name in environ]
    if chosen:
        return f"set by the environment ({', '.join(chosen)})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "refused by mallopt"
    return "kept"
