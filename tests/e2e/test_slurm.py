"""The single-node Slurm of ``scripts/services.sh``: its node is idle and runs an array job."""

from __future__ import annotations

import subprocess
from pathlib import Path


def test_node_is_usable(slurm_cluster: str) -> None:
    sinfo = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%N %T %c", "-n", slurm_cluster],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    node, state, cpus = sinfo.stdout.split()
    assert node == slurm_cluster
    assert state in {"idle", "mixed", "allocated", "completing"}
    assert int(cpus) >= 1


def test_sbatch_wait_runs_an_array_job(slurm_cluster: str, tmp_path: Path) -> None:
    script = tmp_path / "array.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --output={tmp_path}/task-%a.out\n"
        'echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT $SLURM_ARRAY_TASK_MIN"\n'
    )
    subprocess.run(
        ["sbatch", "--wait", "--array=0-3", "--time=5", str(script)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    lines = sorted((tmp_path / f"task-{task}.out").read_text().strip() for task in range(4))
    assert lines == [f"{task} 4 0" for task in range(4)]
