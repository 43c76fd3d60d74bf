"""The resume check shared by the training scripts' tests: a run stopped part-way (SIGKILL or SIGTERM) and resumed
ends exactly where the same run without a stop ends, in weights and in every logged update (CPU runs are
deterministic)."""

import filecmp
import json
import os
import signal
import subprocess
import time

from conftest import ENV, TORCHRUN_ENV, run_script, script_command


def course(run_dir) -> list[dict]:
    """The logged updates without their timings and memory, which differ between runs."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/"))} for r in rows]


def stop_part_way(script: str, flags: list[str], run_dir, after_rows: int, sig, torchrun: int = 0) -> int:
    """Start the run, send `sig` to it (its whole process group under torchrun) once it has logged `after_rows`
    updates, and return its exit code."""
    log = open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".log"), "w")
    proc = subprocess.Popen(
        script_command(script, flags, torchrun), cwd=os.path.dirname(run_dir), env=TORCHRUN_ENV if torchrun else ENV,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= after_rows:
            os.killpg(proc.pid, sig) if torchrun or sig == signal.SIGKILL else proc.send_signal(sig)
            break
        time.sleep(0.02)
    code = proc.wait(timeout=120)
    log.close()
    return code


def check_resume_is_exact(
    script: str, flags: list[str], tmp_path, sig=signal.SIGKILL, torchrun: int = 0, track: bool = False
) -> None:
    """A whole run, and the same run stopped by `sig` after its fourth logged update (checkpoints every 3) then
    resumed with --resume: identical metrics for every update, identical evaluation tables, identical saved files;
    with `track`, the resumed run logs to the stopped run's wandb run."""
    flags = [*flags, "--save_freq", "3", *(["--track"] if track else [])]
    full, part = tmp_path / "full", tmp_path / "part"
    run_script(script, *flags, "--run_dir", str(full), "--output_dir", str(tmp_path / "full_out"), torchrun=torchrun)
    n = len(course(full))
    stopped_flags = [*flags, "--run_dir", str(part), "--output_dir", str(tmp_path / "part_out")]
    code = stop_part_way(script, stopped_flags, part, after_rows=4, sig=sig, torchrun=torchrun)
    logged = course(part)
    assert code != 0 and len(logged) < n, f"the run was not stopped part-way (exit {code}, {len(logged)} of {n} rows)"
    if sig != signal.SIGKILL:  # a signal the script catches: a checkpoint of the last update, and exit 128 + signal
        assert code == 128 + sig, code
        assert os.path.isdir(part / "checkpoints" / f"update_{logged[-1]['update']:06d}")
    proc = run_script(script, *stopped_flags, "--resume", str(part), torchrun=torchrun)
    assert "resumed after update" in proc.stdout
    assert course(part) == course(full)
    evals = sorted(f for f in os.listdir(full) if f.startswith("eval_"))
    assert evals == sorted(f for f in os.listdir(part) if f.startswith("eval_"))
    for name in evals:
        assert filecmp.cmp(full / name, part / name, shallow=False), name
    if track:  # WANDB_MODE=offline: <run_dir>/wandb/offline-run-<time>-<run id>, one per process that logged
        ids = {path.name.rsplit("-", 1)[1] for path in (part / "wandb").glob("offline-run-*")}
        assert len(list((part / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1, ids
    saved = sorted(f for f in os.listdir(tmp_path / "full_out") if f.endswith((".safetensors", ".bin")))
    assert saved
    for name in saved:
        assert filecmp.cmp(tmp_path / "full_out" / name, tmp_path / "part_out" / name, shallow=False), name


def check_killed_early_resumes(script: str, flags: list[str], tmp_path, after_rows: int) -> None:
    """A pre-emptible job passes the same --resume DIR at every launch. The first launch starts the run in DIR (nothing
    is there yet) and is killed with SIGKILL before its first checkpoint, once it has logged `after_rows` updates (0:
    before its first update); the next launch starts the run over in DIR and ends with the weights, and the logged
    updates, of a run that was never killed."""
    full, part = tmp_path / "full", tmp_path / "part"
    run_script(script, *flags, "--run_dir", str(full))
    job = [*flags, "--resume", str(part)]
    code = stop_part_way(script, job, part, after_rows, signal.SIGKILL)
    checkpoints = os.listdir(part / "checkpoints") if os.path.isdir(part / "checkpoints") else []
    assert code == -signal.SIGKILL and not [c for c in checkpoints if c[7:].isdigit()], (code, checkpoints)
    proc = run_script(script, *job)
    assert f"--resume {part}: no complete checkpoint there; starting the run in it" in proc.stdout
    assert course(part) == course(full)
    saved = sorted(f for f in os.listdir(full / "model") if f.endswith((".safetensors", ".bin")))
    assert saved
    for name in saved:
        assert filecmp.cmp(full / "model" / name, part / "model" / name, shallow=False), name
