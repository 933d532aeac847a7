"""Peak-RSS probes shared by the benchmarks that run each operation in a fresh interpreter (Linux /proc)."""

from __future__ import annotations

import resource


def status_kb(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/self/status (Linux only)")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so imports do not count; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb(exact: bool) -> int:
    """The peak RSS in KiB since :func:`reset_peak` (``exact``), else since the process started."""
    return status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
