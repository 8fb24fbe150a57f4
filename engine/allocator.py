"""The C allocator under the CPU tensors (glibc malloc): how much it holds, and handing back what is free.

KV caches grow, are evicted and encoded again; each forward's activations come and go. glibc keeps
freed memory in its arenas for the next allocation, so a process's resident memory can stay far
above what is live, past any budget counted in tensor bytes. `figures()` tells the two apart;
`trim()` returns the free pages to the system (the engine calls it when it goes idle). With another
C library both do nothing."""

from __future__ import annotations

import ctypes
import ctypes.util


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        lib.mallinfo2.restype = _MallInfo2
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        return lib
    except (OSError, AttributeError):  # not glibc (or older than 2.33)
        return None


_LIBC = _libc()


def figures() -> dict | None:
    """MB the allocator holds: `heap_used` (live in its arenas), `heap_free` (freed, kept for reuse),
    `mapped` (large blocks mapped on their own); None without glibc."""
    if _LIBC is None:
        return None
    info = _LIBC.mallinfo2()
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    return {"heap_used_mb": mb(info.uordblks), "heap_free_mb": mb(info.fordblks), "mapped_mb": mb(info.hblkhd)}


def trim() -> bool:
    """Return the arenas' free pages to the system; True if any went."""
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False
