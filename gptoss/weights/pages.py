"""The operating system's memory pages behind a memory-mapped checkpoint.

The weights are never copied: safetensors maps each file, and a page is read from disk the first time a
forward pass touches it. Cold, that first pass of gpt-oss-20b waits on 13.8 GB of page faults with nothing on
the screen; `populate` faults them in beforehand, in order, with a progress bar. `release_pages` gives back
the pages of a tensor that another format replaced.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch
from tqdm import tqdm

MADV_PAGEOUT, MADV_POPULATE_READ = 21, 22
POPULATE_CHUNK = 64 << 20   # bytes per madvise call: fine enough steps for the progress bar


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else 8 GiB as a guess."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "madvise") else None


def populate(tensors: list[torch.Tensor], progress: bool) -> int:
    """Faults in the pages of memory-mapped weights now, in order, with a progress bar on stderr when
    `progress` (MADV_POPULATE_READ, Linux 5.14+: the kernel reads each range in large requests and maps
    it). Pages mapped by the process stay resident where pages merely read into the page cache can be
    dropped (seen on a VM whose page cache kept only half of a 13.8 GB checkpoint that was read through).
    Skipped when the tensors would not fit in the memory available (then they stream from disk as the
    model touches them) or where the call is not supported. Returns the bytes populated."""
    libc = _libc()
    ranges = {}  # page-aligned start -> end, once per storage (a tied embedding appears twice)
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            ranges[t.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE] = t.data_ptr() + t.numel() * t.element_size()
    total = sum(end - start for start, end in ranges.items())
    if libc is None or not total or total > 0.9 * available_memory():
        return 0
    done = 0
    with tqdm(total=total, desc="reading weights into memory", unit="B", unit_scale=True, unit_divisor=1024,
              file=sys.stderr, leave=False, disable=not progress) as bar:
        for start, end in ranges.items():
            for chunk in range(start, end, POPULATE_CHUNK):
                size = min(POPULATE_CHUNK, end - chunk)
                if libc.madvise(ctypes.c_void_p(chunk), ctypes.c_size_t(size), MADV_POPULATE_READ) != 0:
                    return done  # an older kernel (EINVAL): the first forward pass faults the pages in
                done += size
                bar.update(size)
    return done


def release_pages(t: torch.Tensor) -> None:
    """Asks Linux to reclaim the memory pages that lie wholly inside `t` (MADV_PAGEOUT), once a copy in
    another format has replaced it. A memory-mapped checkpoint keeps the whole file mapped while other
    tensors of it live, so without this the original would stay resident and counted in the process's
    RSS. Reclaiming never loses data (a mapped page is read again from its file if touched); where the
    call is not supported, nothing happens."""
    libc = _libc()
    if t.device.type != "cpu" or libc is None:
        return
    start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_PAGEOUT)
