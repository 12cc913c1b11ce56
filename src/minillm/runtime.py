"""Process-level settings that matter for speed on CPU."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import gc
import mmap
import sys

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_tuned = False


def tune_allocator() -> bool:
    """Keep freed activation buffers in the heap instead of returning them to the OS.

    glibc serves allocations above 128 KiB with fresh mmap()s, so every per-layer temporary of a
    batched decode step (gathered K/V pages, MLP activations) is page-faulted in again, every step.
    Raising the mmap and trim thresholds (as MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would)
    lets the heap reuse them.
    A no-op off glibc. Returns whether the setting was applied.
    """
    global _tuned
    libc = _glibc()
    if _tuned or libc is None:
        return _tuned
    _tuned = libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    return _tuned


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim). Building a tokenizer leaves tens of MB
    free inside the heap (a vocabulary's strings, the copies `tokenizers` makes of it), which glibc keeps, and
    which would otherwise add to the load's peak under the weights. A no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_thaw_at_exit = False


def freeze_heap() -> None:
    """In a process that is the engine's own (the CLI, the server's engine process, the benchmarks), once a
    model is loaded: move every live object to the garbage collector's permanent generation.

    Python's full collections walk every tracked object, hundreds of thousands after loading (torch, sympy,
    the model), and so stall decoding each time; frozen objects are never walked. vLLM's engine process
    freezes its heap the same way. Each call first thaws and collects what an earlier
    call froze, so an engine dropped in between (the benchmarks load one after another) is still freed; but a
    frozen object that becomes cyclic garbage is not collected until then, so this is not for library callers.
    """
    global _thaw_at_exit
    gc.unfreeze()
    gc.collect()
    if not _thaw_at_exit:  # thawed at exit, so that shutdown still finalizes them (nanobind-based extensions
        atexit.register(gc.unfreeze)  # report objects left alive then as leaks)
        _thaw_at_exit = True
    gc.freeze()


# ------------------------------------------------------------------ huge pages
# A decode token streams every weight once. On 4 KB pages the bundled model's 97 MB are ~24,000 page
# translations a token, far more than the TLB holds: a page walk every 4 KB of each stream. In one private
# anonymous mapping advised MADV_HUGEPAGE before its first touch they sit on ~50 pages of 2 MB instead,
# and the walks all but vanish. A shared mapping (Python's mmap default) gets no huge pages where shmem
# THP is off, as it is by default; hence MAP_PRIVATE. Where
# THP is off or no huge page is free, the memory is simply on 4 KB pages.
_HUGE_PAGE = 2 << 20


class HugePageArena:
    """One anonymous mapping of `size` bytes on a 2 MB boundary, advised for huge pages where the platform has
    them, handed out as uint8 tensors (`take`), each on a cache line; each tensor keeps the mapping alive.
    Pages are faulted in (zeroed) on first touch: bytes never taken or never written cost no memory."""

    def __init__(self, size: int) -> None:
        self.mapping = None
        if hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and size:
            self.mapping = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            try:
                self.mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: pages are faulted in as 2 MB ones
            except OSError:  # a kernel without transparent huge pages: 4 KB pages, the same memory
                pass
            self.offset = -torch.frombuffer(self.mapping, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE
            self.end = self.offset + size

    def take(self, n: int, small_head: int = 0) -> torch.Tensor:
        """A zeroed uint8 tensor of n bytes (a plain tensor where there is no mapping, or no room left); its first
        `small_head` bytes on 4 KB pages, so that touching its start faults in 4 KB, not 2 MB."""
        if self.mapping is None or not n or self.offset + n > self.end:
            return torch.zeros(n, dtype=torch.uint8)
        buffer = torch.frombuffer(self.mapping, dtype=torch.uint8, count=n, offset=self.offset)
        if small_head and hasattr(mmap, "MADV_NOHUGEPAGE"):
            start = self.offset // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                self.mapping.madvise(mmap.MADV_NOHUGEPAGE, start, self.offset + min(n, small_head) - start)
            except OSError:
                pass
        self.offset += -(-n // 64) * 64
        return buffer


def huge_page_buffers(sizes: list[int], small_head: int = 0) -> list[torch.Tensor]:
    """Zeroed CPU buffers (uint8) of these sizes, together in one `HugePageArena` (`small_head`: as `take`)."""
    arena = HugePageArena(sum(-(-n // 64) * 64 for n in sizes))
    return [arena.take(n, small_head) for n in sizes]


def place_in_huge_pages(model: torch.nn.Module, min_bytes: int = 1 << 16) -> int:
    """Move the model's CPU parameters and buffers of at least `min_bytes` into `huge_page_buffers`, in place
    (`tensor.data` points into them: the same tensor objects, values and ties). Returns the bytes moved."""
    unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # a tied weight once
    moved = [t for t in unique.values() if t.device.type == "cpu" and t.layout == torch.strided
             and t.is_contiguous() and t.nbytes >= min_bytes]
    with torch.no_grad():
        for tensor, buffer in zip(moved, huge_page_buffers([t.nbytes for t in moved])):
            view = buffer.view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
    return sum(t.nbytes for t in moved)
