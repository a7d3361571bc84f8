"""Futex wait / wake on a word of shared memory (Linux, through ctypes: nothing to build).

The shared-memory communicator spins briefly, then sleeps here until a peer's counter
moves, so a rank waiting on a descheduled peer gives its core away instead of burning it.
`wait(addr, expected, timeout_s)` sleeps while the 32-bit word at addr equals expected
(the kernel checks atomically), at most timeout_s; `wake(addr)` wakes every sleeper.
Where futexes are unavailable (not Linux, unknown CPU) AVAILABLE is False and wait()
sleeps for a short fixed time instead: slower to react, still correct."""

from __future__ import annotations

import ctypes
import platform
import sys
import time

_SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1          # shared (not FUTEX_PRIVATE): the word is in a shared mapping
_WAKE_ALL = 2**31 - 1
_FALLBACK_SLEEP_S = 50e-6


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_syscall = ctypes.CDLL(None, use_errno=True).syscall if sys.platform == "linux" and _SYS_FUTEX else None
AVAILABLE = _syscall is not None


def wait(addr: int, expected: int, timeout_s: float) -> None:
    if _syscall is None:
        time.sleep(_FALLBACK_SLEEP_S)
        return
    whole = int(timeout_s)
    timeout = _Timespec(whole, int((timeout_s - whole) * 1e9))
    _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_int(expected & 0xFFFFFFFF),
             ctypes.byref(timeout), None, 0)


def wake(addr: int) -> None:
    if _syscall is not None:
        _syscall(_SYS_FUTEX, ctypes.c_void_p(addr), _FUTEX_WAKE, _WAKE_ALL, None, None, 0)
