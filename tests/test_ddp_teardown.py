"""The scripts' DDP teardown, and the exit probe that checks it in every torchrun test (tests/exit_probe/).

A gloo worker thread still running when Python shuts down can release the last reference to a collective's tensor
after the interpreter is gone and abort the process ("terminate called without an active exception"): about one
2-rank CPU run in ten did. The scripts prevent it by making destroy_process_group really destroy the group, which
joins the threads. This needs two things, and without either one the probe sees threads left (so it can fail).
"""

import os
import subprocess
import sys

import pytest
from conftest import TORCHRUN_ENV, check_gloo_threads_joined

PROGRAM = """
import sys
import torch
import torch.distributed as dist
if sys.argv[1] != "late-import":
    import torch.distributed.nn  # as the scripts do: before init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
policy = DDP(torch.nn.Linear(4, 4))  # DDP imports torch.distributed.nn if nobody did before
policy(torch.randn(2, 4)).sum().backward()
dist.broadcast(torch.ones(3), 0)
if sys.argv[1] != "keep-ddp":
    del policy  # as the scripts do
dist.destroy_process_group()
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="the exit probe reads Linux /proc")
# The two negative controls (each mistake leaves threads) are slow; every torchrun test checks the scripts' teardown.
@pytest.mark.parametrize(
    "mode", ["scripts", *(pytest.param(m, marks=pytest.mark.slow) for m in ("late-import", "keep-ddp"))]
)
def test_teardown_joins_gloo_threads(mode, tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(PROGRAM)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), mode],
        env=TORCHRUN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )  # fmt: skip
    if mode == "scripts":
        check_gloo_threads_joined(proc.stdout, ranks=2)
    else:
        with pytest.raises(AssertionError):
            check_gloo_threads_joined(proc.stdout, ranks=2)
