"""Peak memory of a piece of work: the process's resident set (Linux) and,
when CUDA is in use, the device allocator's peak.

The RSS high-water mark (``VmHWM``) is reset at the start by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0), so the peak belongs to the work and
not to whatever ran before in the process; where that is not allowed the
report says the peak is the whole process's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    rss_start_bytes: Optional[int] = None
    rss_peak_bytes: Optional[int] = None
    rss_peak_is_process: bool = False  # the reset was refused: the peak since the process started
    cuda_peak_bytes: Optional[int] = None

    def summary(self) -> str:
        parts = []
        if self.rss_peak_bytes is not None:
            parts.append(f"peak RSS {self.rss_peak_bytes / 2**20:.0f} MiB"
                         + (" (process)" if self.rss_peak_is_process else
                            f" (+{(self.rss_peak_bytes - (self.rss_start_bytes or 0)) / 2**20:.0f} MiB over the start)"))
        if self.cuda_peak_bytes is not None:
            parts.append(f"CUDA peak {self.cuda_peak_bytes / 2**20:.0f} MiB")
        return ", ".join(parts) or "peak memory not measurable here"


@contextlib.contextmanager
def measure_peak(cuda: bool = False) -> Iterator[PeakMemory]:
    """``with measure_peak(cuda) as m: ...`` fills ``m`` when the block ends."""
    m = PeakMemory()
    m.rss_peak_is_process = not _reset_rss_peak()
    kib = _status_kib("VmRSS")
    m.rss_start_bytes = None if kib is None else kib * 1024
    cuda = cuda and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        yield m
    finally:
        hwm = _status_kib("VmHWM")
        m.rss_peak_bytes = None if hwm is None else hwm * 1024
        if cuda:
            m.cuda_peak_bytes = torch.cuda.max_memory_allocated()
