"""Put on PYTHONPATH by tests/conftest.py for torchrun runs. Two probes, printed by each worker:

- as destroy_process_group() is called, the largest difference between this rank's weights and rank 0's, over every
  module a script wrapped in DDP: ranks that drift apart would silently invalidate a run;
- as the worker exits, how many gloo worker threads are still running. Any left after the script's teardown can abort
  the process during interpreter shutdown (tests/test_ddp_teardown.py).
"""

import atexit
import os


def _report_gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended after listdir (FileNotFoundError or ProcessLookupError)
            pass
    os.write(1, f"gloo threads at exit: {sum('gloo' in n for n in names)}\n".encode())


def _install_rank_sync_probe():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    modules, ddp_init, destroy = [], DistributedDataParallel.__init__, dist.destroy_process_group

    def init(self, module, *args, **kwargs):
        modules.append(module)  # the inner module: the scripts drop their DDP wrapper before the teardown
        ddp_init(self, module, *args, **kwargs)

    def check_then_destroy(*args, **kwargs):
        diff = 0.0
        for module in modules:
            for p in module.parameters():
                q = p.detach().clone()
                dist.broadcast(q, 0)
                diff = max(diff, (p.detach() - q).abs().max().item())
        modules.clear()
        os.write(1, f"ddp max param diff across ranks: {diff}\n".encode())  # one write: ranks' lines stay whole
        destroy(*args, **kwargs)

    DistributedDataParallel.__init__ = init
    dist.destroy_process_group = check_then_destroy


if "LOCAL_RANK" in os.environ:  # torchrun workers only
    _install_rank_sync_probe()
    if os.path.isdir("/proc/self/task"):  # Linux only
        atexit.register(_report_gloo_threads)
