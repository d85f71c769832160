"""Run a command against a two-node Ray cluster on 127.0.0.1, all inside the network namespace this is started
in (see tests/test_multinode.py): a `ray start --head` and a second `ray start --address` node, 2 CPUs each, with
their own resources and labels. Prints one JSON line: the alive nodes (id -> resources) and the command's exit
status and output tail.

    python tests/multinode_cluster.py LOG_FOLDER -- COMMAND...
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import start_ray_node, stop, wait_for  # noqa: E402

NODES = r"""
import json, ray
ray.init(address="auto", log_to_driver=False)
print(json.dumps({n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}))
"""


def alive_nodes(env: dict[str, str]) -> dict[str, dict[str, float]]:
    """Node id -> resources of every alive node, asked of the cluster by a separate driver."""
    run = subprocess.run([sys.executable, "-c", NODES], env=env, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(logs: Path, command: list[str]) -> dict:
    # multi-node Ray needs this; the network namespace keeps every server it binds on loopback
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token"}
    head = start_ray_node(env, logs / "head.log", None, "--num-cpus=2", '--resources={"head": 1}', "--labels=zone=a")
    nodes = [head]
    try:
        wait_for(f"http://127.0.0.1:{head.ports['--dashboard-port']}/api/version", head.process)
        env["RAY_ADDRESS"] = f"127.0.0.1:{head.ports['--port']}"
        second = start_ray_node(
            env, logs / "second.log", env["RAY_ADDRESS"], "--num-cpus=2", '--resources={"second": 1}', "--labels=zone=b"
        )
        nodes.append(second)
        deadline = time.monotonic() + 120
        while len(alive := alive_nodes(env)) < 2 and time.monotonic() < deadline:
            if second.process.poll() is not None:
                raise RuntimeError((logs / "second.log").read_text()[-2000:])
            time.sleep(1)
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        return {"nodes": alive, "returncode": run.returncode, "output": (run.stdout + run.stderr)[-4000:]}
    finally:
        for node in reversed(nodes):
            stop(node.process)
            shutil.rmtree(node.temp_dir, ignore_errors=True)


if __name__ == "__main__":
    separator = sys.argv.index("--")
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[separator + 1 :])))
