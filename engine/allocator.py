"""The memory under the engine: what the C allocator (glibc malloc) holds, and handing back what is free.

KV caches grow, are evicted and encoded again; each forward's activations come and go. glibc keeps
freed memory in its arenas for the next allocation, so a process's resident memory can stay far
above what is live, past any budget counted in tensor bytes. `figures()` tells the two apart;
`trim()`, called when the engine goes idle, frees what only reference cycles still hold (one garbage
collection) and returns the arenas' free pages to the system; `freeze()` after loading keeps the
load's objects out of every later collection. With another C library only the collection runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


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
    """Free what only reference cycles hold, then return the arenas' free pages; True if any went."""
    gc.collect()
    return bool(_LIBC.malloc_trim(0)) if _LIBC is not None else False


def freeze() -> None:
    """The objects made so far (the model, the tokenizer's tables) live as long as the process: leave
    them out of later collections, which would otherwise walk all of them (~150 ms) each time."""
    gc.collect()
    gc.freeze()
