"""What the bench reads about the server process from /proc (Linux): its resident memory and its CPU time, and
the CPU time of a PostgreSQL server on the same machine."""

from __future__ import annotations

import os
from pathlib import Path


def rss_mib(pid: int) -> float:
    """Resident memory (VmRSS) of the process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of all the process's threads so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    """The parent of a process on this machine, or None if there is no such process here."""
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process, its living children and the children it has reaped: a PostgreSQL server's
    postmaster and its backends, including those that ended (connections closed) meanwhile."""
    fields = _stat_fields(pid)
    total = sum(int(f) for f in fields[11:15])  # utime, stime, and cutime, cstime of reaped children
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            child = _stat_fields(int(entry.name))
        except OSError:  # ended meanwhile
            continue
        if int(child[1]) == pid:
            total += int(child[11]) + int(child[12])
    return total / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, …; utime is [11]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
