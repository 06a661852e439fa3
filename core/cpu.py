"""What this CPU can do, read once from /proc/cpuinfo (Linux; elsewhere: no flags)."""

from __future__ import annotations

import functools
import os

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in /proc/cpuinfo; empty where it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    return any(f in cpu_flags() for f in NATIVE_BF16_FLAGS)


def cpu_threads(configured: int | None = None) -> int:
    """Intra-op threads of a CPU backend: ``configured`` (EngineConfig.num_threads, ``--threads``), else
    ``$OMP_NUM_THREADS`` (the variable torch's OpenMP pool reads, so every backend follows the same setting),
    else every core. Several engine processes on one machine (workers, a test run) each set it to their share
    of the cores: more threads than cores spin-wait on each other and burn CPU for nothing."""
    if configured:
        return configured
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1
