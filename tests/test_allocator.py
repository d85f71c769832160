"""glibc malloc keeps freed memory after ``keep_freed_memory``; the environment's own settings win."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# allocates, touches and frees 24 MiB with libc's malloc; prints whether the settings were changed and
# how much the resident size fell when the block was freed
FREE_A_BLOCK = """
import ctypes, ctypes.util, json, os, sys
from pretrainlab.train.allocator import keep_freed_memory
changed = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
size = 24 << 20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
before = resident()
libc.free(block)
print(json.dumps({"changed": changed, "released": before - resident()}))
"""


def free_a_block(mode: str, **env: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", FREE_A_BLOCK, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def test_glibc_defaults_give_a_freed_block_back_to_the_kernel():
    assert free_a_block("default")["released"] >= 20 << 20


def test_kept_freed_memory_stays_in_the_process():
    result = free_a_block("keep")
    assert result["changed"] is True
    assert result["released"] < 4 << 20


def test_the_environment_settings_win():
    result = free_a_block("keep", MALLOC_TRIM_THRESHOLD_="0")
    assert result["changed"] is False
    assert result["released"] >= 20 << 20
