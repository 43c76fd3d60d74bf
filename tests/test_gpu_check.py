"""eval/gpu_check.py: its --dry run on CPU writes every field of gpu_check.json; the deadline kills a step's whole
process tree; a failing script is recorded; the MFU formula by hand. The full --dry run (every script) is CI's."""

import json
import os
import subprocess
import sys
import time

import pytest

from eval.benchmark import Args as BenchmarkArgs
from eval.gpu_check import GPU, SCRIPTS, check_script, rebel_mfu, run_logged

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_train_script.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


def test_dry_run_of_rebel_writes_every_field(tmp_path):
    """--dry with rebel only: the device probe, the tiny models, sampling, rebel, Figure 2 at both shapes, MFU."""
    out = tmp_path / "check"
    command = [sys.executable, "-m", "eval.gpu_check", "--dry", "--out", str(out), "--scripts", "rebel"]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("0 failed, 0 skipped")  # the table is printed last
    report = json.load(open(out / "gpu_check.json"))
    assert report["device"]["bf16_peak_tflops"] > 0 and report["device"]["bandwidth_gb_s"] > 0
    for name in ("rebel", "ppo", "rloo", "dpo", "iterative_dpo", "sft", "reward"):
        assert {"ok", "s_per_update", "peak_gb"} <= set(report["scripts"][name]), name
    rebel = report["scripts"]["rebel"]
    assert rebel["ok"] and rebel["exit_code"] == 0 and rebel["loss_finite"] and rebel["updates"] == 2
    assert rebel["s_per_update"] > 0 and rebel["peak_gb"] > 0 and rebel["phases"]["update"] > 0
    assert "--precision bf16" in rebel["command"] and "torch.distributed.run" in rebel["command"]
    assert report["scripts"]["ppo"]["skipped"] == "not selected (--scripts)" and not report["scripts"]["ppo"]["ok"]
    sampling = report["sampling"]
    for key in ("dynamic_ms_per_token", "static_ms_per_token", "floor_ms_per_token", "static_over_floor"):
        assert sampling[key] > 0, key
    floor = (sampling["weight_bytes"] + sampling["kv_cache_bytes"]) / (report["device"]["bandwidth_gb_s"] * 1e9)
    assert sampling["floor_ms_per_token"] == pytest.approx(floor * 1000)
    assert report["figure2"]["tiny"]["rebel"]["ok"] and report["figure2"]["tiny-llama"]["rebel"]["ok"]
    assert 0 < report["mfu"]["mfu"] < report["mfu"]["mfu_all_matmuls"]


def test_the_deadline_kills_the_whole_process_group(tmp_path):
    # A parent that starts a child, as torchrun starts its workers; both would sleep for a minute.
    child = "import time; time.sleep(60)"
    parent = f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
    parent += "print(p.pid, flush=True); time.sleep(60)"
    start = time.time()
    code, wall = run_logged([sys.executable, "-c", parent], str(tmp_path / "log"), deadline=time.time() + 3)
    assert code is None and 3 <= wall < 10 and time.time() - start < 10
    pid = int((tmp_path / "log").read_text().splitlines()[-1])
    for _ in range(50):  # the orphaned child is gone once init has reaped it
        if not os.path.exists(f"/proc/{pid}") or "State:\tZ" in open(f"/proc/{pid}/status").read():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid}, started by the killed step, still runs")


def test_a_failing_or_lossless_script_is_recorded(tmp_path):
    bench = BenchmarkArgs(updates=2, batch_size=2, query_length=16)
    failed = check_script(f"{FAKE} --fail", str(tmp_path / "fail"), bench, time.time() + 60)
    assert not failed["ok"] and failed["exit_code"] == 1 and failed["error"].startswith("exit code 1")
    assert "failing on purpose" in open(failed["log"]).read()
    # The fake script logs timings but no loss/ metric: the run is not ok, and its timings are kept.
    lossless = check_script(FAKE, str(tmp_path / "fake"), bench, time.time() + 60)
    assert not lossless["ok"] and lossless["error"] == "non-finite or missing loss"
    assert lossless["s_per_update"] == pytest.approx(4.0)  # update 2's time/total; update 1 is the warm-up
    assert lossless["peak_gb"] == 9.0  # the peak of every update, the warm-up's included


def test_rebel_mfu_by_hand():
    # Pythia-1.4B, LoRA rank 1024 on query_key_value (tests/test_eval_benchmark.py): 201,326,592 trained parameters.
    # Update phase: 4 epochs x 64 prompts x 2 responses x (512 + 53) tokens = 289,280 tokens, here in 2 s.
    m = rebel_mfu({"phases": {"update": 2.0}}, GPU, peak_tflops=800.0)
    assert m["trained_params"] == 201_326_592 and m["tokens"] == 289_280
    assert m["all_params"] == 1_414_647_808 + 201_326_592
    assert m["mfu"] == pytest.approx(6 * 201_326_592 * 289_280 / 2.0 / 800e12)
    assert m["mfu_all_matmuls"] == pytest.approx((4 * m["all_params"] + 2 * 201_326_592) * 289_280 / 2.0 / 800e12)
    assert rebel_mfu({"ok": False}, GPU, peak_tflops=800.0)["mfu"] is None  # rebel did not run: no MFU
    assert SCRIPTS["rebel"].split()[0] == "rebel.py" and "--fsdp" in SCRIPTS["rebel_fsdp"]
