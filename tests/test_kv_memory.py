"""The CPU KV cache's host memory: zeroed, writable, and advised for transparent huge pages."""

import mmap
from pathlib import Path

import pytest
import torch

from gateway.executor.model_runner import huge_page_zeros


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that holds `address` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:   # a mapping's header: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_huge_page_zeros_is_zeroed_writable_and_advised(dtype):
    numel = 3 * 2**20 + 5            # not a multiple of a page
    t = huge_page_zeros(numel, dtype)
    assert t.shape == (numel,) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % 4096 == 0
    assert not t.any()
    t[-1] = 7
    assert t[-1].item() == 7
    if hasattr(mmap, "MADV_HUGEPAGE") and Path("/proc/self/smaps").exists():
        assert "hg" in _vm_flags(t.data_ptr())   # MADV_HUGEPAGE took
