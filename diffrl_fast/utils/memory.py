"""Peak memory of a stretch of work, on CUDA (allocator statistics) or CPU (the process's peak RSS)."""
from __future__ import annotations

import torch


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """``reset()`` then ``peak_mb()``: the highest memory in use since the reset, in MB.

    CUDA: torch.cuda.max_memory_allocated. CPU: the process's peak resident set (VmHWM, reset by writing
    5 to /proc/self/clear_refs; Linux); it counts every allocation, PyTorch's or not. ``extra_mb()`` is
    the peak above what was in use at the reset.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.base_mb = 0.0

    def current_mb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated() / 2**20
        return _status_kb("VmRSS:") / 1024

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self.base_mb = self.current_mb()

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return _status_kb("VmHWM:") / 1024

    def extra_mb(self) -> float:
        return max(0.0, self.peak_mb() - self.base_mb)
