"""Put on PYTHONPATH by tests/conftest.py for torchrun runs: each worker reports, as it exits, how many gloo worker
threads are still running. Any left after the script's teardown can abort the process during interpreter shutdown."""

import atexit
import os


def _report_gloo_threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # a thread that ended after listdir
            pass
    print(f"gloo threads at exit: {sum('gloo' in n for n in names)}", flush=True)


if "LOCAL_RANK" in os.environ and os.path.isdir("/proc/self/task"):  # torchrun workers only, Linux only
    atexit.register(_report_gloo_threads)
