"""Shared fixtures: a micro-sized toy task with an SFT policy and a reward model, built once per test session."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Tiny models run fastest on one thread per process, and torchrun tests start two processes on two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
LENGTHS = ["--query_length", "64", "--response_length", "24"]


def run_script(
    script: str, *flags: str, torchrun: int = 0, cwd: str | None = None, check: bool = True, timeout: int = 300
):
    """Run a top-level script as a user would; return the CompletedProcess (stdout and stderr merged)."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)]
        if torchrun
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, os.path.join(ROOT, script), *flags], cwd=cwd or ROOT, env=ENV, timeout=timeout,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited with {proc.returncode}:\n{proc.stdout[-4000:]}")
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
    run_script("reward.py", *small, "--query_dataset", str(d / "data/preference"), "--sft_model_path", str(d / "sft"),
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
