import platform

import numpy as np
import pytest

from broker.runtime import retain_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_allocator_takes_the_settings_and_large_arrays_still_work():
    assert retain_freed_memory() is True
    for _ in range(3):  # 64 MiB arrays: above glibc's largest mmap threshold
        a = np.ones((4096, 4096), np.float32)
        assert float(a.sum()) == 4096 * 4096
        del a
