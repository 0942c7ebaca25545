"""DDP and FSDP2 on two CPU processes (gloo) give the single-process loss and gradients."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_distributed_check_passes_on_two_cpu_processes():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "scripts" / "distributed_check.py"), "--backend", "gloo", "--steps", "2"]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("PASS")
    assert sum(" step " in line and line.endswith(" ok") for line in lines) == 4  # 2 steps x (DDP, FSDP2)
    assert any(
        line.startswith("fsdp save_pretrained refused on the shards: True; gathered") for line in lines
    )
