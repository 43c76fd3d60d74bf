"""Runs that survive: a run stopped part-way and resumed ends exactly where an uninterrupted run ends (rebel.py in
one process and under two-rank torchrun, a baseline stopped by SIGTERM); what a resumed run refuses; the NaN guard."""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import check_fails_with, run_script
from resume_checks import check_killed_early_resumes, check_resume_is_exact
from rl_checks import bad_input_message

# Seven updates, an evaluation every three (their sampling draws on the RNG state a checkpoint must carry).
LONGER = ["--total_episodes", "56", "--eval_freq", "3"]


def test_rebel_resumes_exactly_after_sigkill(toy, tmp_path):
    check_resume_is_exact("rebel.py", [*toy.rl_flags, *LONGER], tmp_path, signal.SIGKILL)


@pytest.mark.slow
def test_rebel_resumes_exactly_under_torchrun(toy, tmp_path):
    check_resume_is_exact("rebel.py", [*toy.rl_flags, *LONGER], tmp_path, signal.SIGKILL, torchrun=2)


@pytest.mark.slow
def test_ppo_saves_on_sigterm_and_resumes_exactly(toy, tmp_path):
    check_resume_is_exact("ppo.py", [*toy.rl_flags, *LONGER], tmp_path, signal.SIGTERM, track=True)


def test_checkpoints_are_complete_and_only_the_last_are_kept(toy, tmp_path):
    run = tmp_path / "run"
    run_script("rebel.py", *toy.rl_flags, *LONGER, "--save_freq", "2", "--keep_checkpoints", "2",
               "--output_dir", "", "--run_dir", str(run))  # fmt: skip
    # every --save_freq updates and at the last one (7), the last --keep_checkpoints kept
    assert sorted(os.listdir(run / "checkpoints")) == ["update_000006", "update_000007"]
    last = run / "checkpoints" / "update_000006"
    trainer = json.loads((last / "trainer.json").read_text())
    assert trainer["update"] == 6 and trainer["world_size"] == 1 and trainer["flags"]["save_freq"] == 2
    assert {".metadata", "rng_rank0.pt"} <= set(os.listdir(last))
    # Under LoRA only the adapter trains, so only the adapter (and its optimizer state) is saved.
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert weights and all("lora_" in k for k in weights), weights
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in saved)


@pytest.mark.parametrize("script", ["rebel.py", *(pytest.param(s, marks=pytest.mark.slow) for s in ["ppo.py", "rloo.py",
                                                                                             "dpo.py", "iterative_dpo.py"])])  # fmt: skip
def test_a_finished_run_launched_again_with_its_resume_ends_cleanly(toy, tmp_path, script):
    """A pre-emptible job passes the same --resume at every launch, also after the run has finished: the loop has no
    update left, and the run evaluates, saves and exits 0 again (it once crashed on the loop's unset counter)."""
    run, flags = (
        tmp_path / "run",
        [*toy.rl_flags, "--preference_dataset", toy.preference] if script == "dpo.py" else toy.rl_flags,
    )
    run_script(script, *flags, "--resume", str(run))
    saved = (run / "model" / "adapter_model.safetensors").read_bytes()
    again = run_script(script, *flags, "--resume", str(run))
    assert "resumed after update 2" in again.stdout and "Traceback" not in again.stdout
    assert (run / "model" / "adapter_model.safetensors").read_bytes() == saved  # the same policy, saved again


def test_a_new_run_refuses_a_non_empty_run_dir(toy, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"update": 1}\n')
    check_fails_with("rebel.py", toy.rl_flags, f"--run_dir {tmp_path} is not empty: pass --resume", tmp_path)


def test_resume_refuses_changed_flags_and_missing_checkpoints(toy, tmp_path):
    run = tmp_path / "run"
    run_script("rebel.py", *toy.rl_flags, "--save_freq", "1", "--output_dir", "", "--run_dir", str(run))
    changed = bad_input_message("rebel.py", [*toy.rl_flags, "--lr", "5e-4", "--resume", str(run)])
    assert "flags differ from the run's: --lr 0.001 (now 0.0005)" in changed
    shutil.rmtree(run / "checkpoints" / "update_000001")
    (run / "checkpoints" / "update_000002" / ".metadata").write_bytes(b"garbage")
    damaged = bad_input_message("rebel.py", [*toy.rl_flags, "--resume", str(run / "checkpoints" / "update_000002/")])
    assert "cannot read the checkpoint" in damaged and damaged.count("\n") == 0


def test_a_nan_reward_stops_before_the_optimizer_steps(toy, tmp_path):
    """A reward model that returns NaN stops the run where it first scores (the evaluation before update 1), naming
    it, with the batch saved, before the optimizer steps."""
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(toy.rm)
    with torch.no_grad():
        rm.score.weight[0, 0] = float("nan")
    rm.save_pretrained(tmp_path / "rm")
    flags = list(toy.rl_flags)
    flags[flags.index("--reward_model_path") + 1] = str(tmp_path / "rm")
    run = tmp_path / "run"
    check_fails_with("rebel.py", flags, "the evaluation's scores: 8 of 8 values are NaN or inf", run)
    assert not os.path.exists(run / "metrics.jsonl") or not (run / "metrics.jsonl").read_text()
    dump = torch.load(run / "nonfinite_rank0.pt", weights_only=True)
    assert dump["the evaluation's scores"].shape == (8,) and dump["the evaluation's scores"].isnan().all()


@pytest.mark.slow
def test_sft_saves_on_ctrl_c_and_resumes_exactly(toy, tmp_path):
    flags = ["--query_dataset", toy.tldr, "--base_model", toy.base, "--batch_size", "32",
             "--per_device_train_batch_size", "16", "--lr", "3e-3", "--query_length", "64", "--response_length", "24"]  # fmt: skip
    check_resume_is_exact("sft.py", flags, tmp_path, signal.SIGINT)


def test_a_run_killed_before_its_first_checkpoint_resumes(toy, tmp_path):
    """With the default --save_freq 20, a job pre-empted before update 20 left a folder that neither --resume nor the
    same command would take: it failed at every launch. The same --resume at every launch now finishes the run."""
    check_killed_early_resumes("rebel.py", toy.rl_flags, tmp_path, after_rows=0)


def lm_script_flags(toy, script: str) -> list[str]:
    """Toy flags of every LM script, for a run of several updates."""
    if script in ("sft.py", "reward.py"):
        small = ["--query_dataset", toy.tldr, "--batch_size", "32", "--per_device_train_batch_size", "16", "--lr",
                 "3e-3", "--query_length", "64", "--response_length", "24"]  # fmt: skip
        if script == "sft.py":
            return [*small, "--base_model", toy.base]
        return [*small, "--preference_dataset", toy.preference, "--sft_model_path", toy.sft]
    return [*toy.rl_flags, *LONGER, *(["--preference_dataset", toy.preference] if script == "dpo.py" else [])]


@pytest.mark.slow
@pytest.mark.parametrize(
    "script", ["sft.py", "reward.py", "rebel.py", "ppo.py", "rloo.py", "dpo.py", "iterative_dpo.py"]
)
def test_every_script_killed_before_its_first_checkpoint_resumes(toy, tmp_path, script):
    """Killed after its second update: the default --save_freq 20 writes no checkpoint before the last."""
    check_killed_early_resumes(script, lm_script_flags(toy, script), tmp_path, after_rows=2)


def test_sft_and_reward_checkpoint_their_last_update(toy):
    """The toy's SFT and reward-model runs (8 updates, --save_freq 20) end with a checkpoint of update 8, written
    before the final save: a save that fails loses no training."""
    for run in ("sft", "rm"):
        assert os.listdir(toy.dir / "runs" / run / "checkpoints") == ["update_000008"]
