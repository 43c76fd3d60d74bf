import json
import os
import shutil
import subprocess
import sys

import pytest

from eval.benchmark import Args, main, parse_cli, summarize_run

FAKE = os.path.join(os.path.dirname(__file__), "fake_train_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_scripts(tmp_path):
    for name in ("rebel.py", "ppo.py", "dpo.py"):
        shutil.copy(FAKE, tmp_path / name)
    return tmp_path


def test_summarize_run_discards_warmup():
    records = [
        {"update": u, "time/total": 10.0 if u == 1 else 2.0, "memory/peak_gb": 9.0 if u == 1 else 1.0}
        for u in (3, 1, 2)
    ]
    s = summarize_run(records, warmup=1)  # the warm-up is update 1 even when lines arrive out of order
    assert s["time/total"] == 2.0 and s["memory/peak_gb"] == 1.0 and s["time/generation"] == 0.0
    assert s["updates_measured"] == 2 and s["time/other"] == 2.0
    with pytest.raises(ValueError, match="raise --updates"):
        summarize_run(records, warmup=3)


def test_parse_cli_passes_extra_args_through():
    args = parse_cli(["--scripts", "rebel.py", "ppo.py", "--updates", "3", "--", "--lr", "3e-6", "--track", "True"])
    assert args.scripts == ("rebel.py", "ppo.py") and args.updates == 3
    assert args.extra_args == ("--lr", "3e-6", "--track", "True")


def test_benchmark_cli_on_fake_scripts(fake_scripts, tmp_path):
    out = tmp_path / "bench"
    scripts = [str(fake_scripts / "rebel.py"), str(fake_scripts / "ppo.py")]
    command = [sys.executable, "-m", "eval.benchmark", "--scripts", *scripts, "--updates", "5", "--warmup", "1"]
    command += ["--batch_size", "4", "--query_length", "16", "--output_dir", str(out), "--", "--lr", "3e-6"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.load(open(out / "benchmark.json"))
    for r in report["results"]:
        # Updates 2-5 alternate generation 1.5 / 1.0 s and memory 1.5 / 1.0 GiB; the warm-up (5 s, 9 GiB) is gone.
        assert r["updates_measured"] == 4 and r["updates_discarded"] == 1
        assert r["time/generation"] == pytest.approx(1.25) and r["time/update"] == pytest.approx(2.0)
        assert r["time/total"] == pytest.approx(4.25) and r["time/other"] == pytest.approx(0.25)
        assert r["memory/peak_gb"] == 1.5
    argv = json.load(open(out / "runs" / "rebel" / "argv.json"))
    assert (
        argv["args"]["total_episodes"] == 20 and argv["args"]["query_length"] == 16 and argv["args"]["eval_freq"] == 0
    )
    assert argv["args"]["output_dir"] == "" and argv["args"]["track"] == "" and argv["unknown"] == ["--lr", "3e-6"]
    table = (out / "benchmark.md").read_text()
    assert "| rebel | 4 | 1.250 | 0.500 | 0.250 | 2.000 |" in table and "4.250 ± " in table and "| 1.50 |" in table
    assert (out / "benchmark.png").stat().st_size > 1000


def test_benchmark_dpo_like_failure_and_reuse(fake_scripts, tmp_path):
    out = str(tmp_path / "bench")
    dpo = Args(
        scripts=(str(fake_scripts / "dpo.py"),),
        updates=3,
        warmup=1,
        batch_size=2,
        output_dir=out,
        extra_args=("--no_generation",),
    )
    [r] = main(dpo)
    assert r["time/generation"] == 0.0 and r["time/total"] == pytest.approx(3.0)
    [again] = main(Args(scripts=dpo.scripts, warmup=2, output_dir=out, reuse=True))  # re-summarised, not rerun
    assert again["updates_measured"] == 1
    # A --scripts entry with a flag of its own: it reaches that script only, and names the run "ppo --fail".
    [failed] = main(Args(scripts=(f"{fake_scripts / 'ppo.py'} --fail",), updates=3, batch_size=2, output_dir=out))
    assert "exit code 1" in failed["error"]
    assert "failing on purpose" in open(os.path.join(out, "runs", "ppo_fail.log")).read()
    assert "| ppo --fail | failed: exit code 1" in open(os.path.join(out, "benchmark.md")).read()


def test_benchmark_torchrun_launch(fake_scripts, tmp_path):
    out = str(tmp_path / "bench")
    [r] = main(
        Args(
            scripts=(str(fake_scripts / "rebel.py"),),
            updates=3,
            warmup=1,
            batch_size=2,
            nproc_per_node=2,
            output_dir=out,
        )
    )
    assert "error" not in r, open(os.path.join(out, "runs", "rebel.log")).read()
    assert json.load(open(os.path.join(out, "runs", "rebel", "argv.json")))["world_size"] == 2
