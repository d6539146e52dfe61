"""The C heap of the processes s2cli starts (decode workers): glibc's malloc told to keep freed memory for the next
image, so an image's decode, resize and array buffers are not fresh pages (each page a fault) every time."""
from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks under this come from the heap: glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)
TRIM_THRESHOLD = 256 << 20  # freed memory kept at the heap's top before it is returned to the system


def keep_freed_memory() -> bool:
    """In this process, allocations under 32 MB come from malloc's heap, and freed memory (up to 256 MB of it) stays
    there for the next allocation instead of going back to the system at once. Without it, glibc maps each large
    buffer afresh (an image's decoded pixels, Pillow's resize passes, numpy and torch arrays: a few MB each) and
    unmaps it when freed, so every page of every image's buffers faults again. Returns whether it was applied
    (glibc's Linux malloc only). For processes s2cli owns: their peak memory is kept until they exit."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
