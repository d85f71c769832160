"""Security defaults: a local Ray started the way a job starts it (``python jobs/pretrain.py`` in a shell
that exported nothing) listens on 127.0.0.1 only, every one of its processes included, and so does Ray
under every other job's imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

LOOPBACK = {"127.0.0.1", "::1"}
SCRIPT_FOLDERS = ("jobs", "benchmarks")
SCRIPTS = sorted(path.stem for folder in SCRIPT_FOLDERS for path in (REPO / folder).glob("*.py"))

IMPORT_ORDER = r"""
import json, multiprocessing, sys
sys.path[:0] = ["jobs", "benchmarks"]
import matplotlib.pyplot, mlflow, sklearn, timm, torch
assert not {"ray", "pretrainlab"} & set(sys.modules), "the shared imports must leave Ray and pretrainlab to the jobs"

def cluster_mode(job):
    __import__(job)
    import ray._private.ray_constants as constants
    return str(constants.ENABLE_RAY_CLUSTER)

if __name__ == "__main__":
    jobs = sys.argv[1:]
    with multiprocessing.get_context("fork").Pool(len(jobs), maxtasksperchild=1) as pool:
        print(json.dumps(dict(zip(jobs, pool.map(cluster_mode, jobs, chunksize=1)))))
"""

LISTENERS = r"""
import importlib.util, ipaddress, json, os, sys
sys.path.insert(0, "jobs")
import pretrain  # the job's own imports, in its order: pretrainlab before ray
from pretrainlab.cluster import init_ray

def tree(pid):
    found = {pid}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = open(f"/proc/{pid}/task/{task}/children").read().split()
        except OSError:
            continue
        for child in children:
            found |= tree(int(child))
    return found

def listening_inodes():
    # /proc/net/tcp{,6}: local address as hex, state 0A = LISTEN, inode in column 10
    found = {}
    for name, size in (("tcp", 4), ("tcp6", 16)):
        for line in open(f"/proc/net/{name}").read().splitlines()[1:]:
            fields = line.split()
            address, state, inode = fields[1].split(":")[0], fields[3], fields[9]
            if state != "0A":
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
            ip = ipaddress.ip_address(raw)
            found[inode] = str(getattr(ip, "ipv4_mapped", None) or ip)
    return found

init_ray(num_cpus=1, include_dashboard=True)
inodes, addresses = listening_inodes(), []
for pid in tree(os.getpid()):
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        continue
    addresses += [inodes[link[8:-1]] for link in links if link.startswith("socket:[") and link[8:-1] in inodes]
print(json.dumps(sorted(set(addresses))))
"""


def unexported_env() -> dict[str, str]:
    """This process's environment without what ``make`` exports for Ray."""
    env = dict(os.environ)
    for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS"):
        env.pop(name, None)
    return env


@pytest.mark.needs_ray
def test_a_local_ray_listens_on_loopback_only():
    env = unexported_env()
    run = subprocess.run(
        [sys.executable, "-c", LISTENERS], env=env, cwd=REPO, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    addresses = json.loads(run.stdout.strip().splitlines()[-1])
    assert addresses, "found no listening socket: the check itself is broken"
    assert set(addresses) <= LOOPBACK, addresses


@pytest.mark.slow
def test_every_job_and_benchmark_imports_pretrainlab_before_ray():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, on import; pretrainlab sets it, so it must come first.
    Each job or benchmark script is imported in a fresh child process of its own, forked from one that holds
    the heavy shared imports (none of which imports Ray or pretrainlab)."""
    run = subprocess.run(
        [sys.executable, "-c", IMPORT_ORDER, *SCRIPTS],
        env=unexported_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    modes = json.loads(run.stdout.strip().splitlines()[-1])
    assert modes == dict.fromkeys(SCRIPTS, "False"), "these scripts import ray before pretrainlab: " + ", ".join(
        script for script, mode in modes.items() if mode != "False"
    )
