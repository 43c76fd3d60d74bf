"""--fsdp (FSDP2, torch's fully_shard) on CPU with gloo: a two-rank sharded run ends where the two-rank DDP run ends,
under LoRA (adapters sharded with their frozen base), in full fine-tuning (the reference sharded too) and in PPO (the
critic sharded too, saved merged), and a sharded run resumes exactly from its torch.distributed.checkpoint checkpoint."""

import json
import signal

import pytest
from conftest import run_script
from resume_checks import check_resume_is_exact, course
from rl_checks import bad_input_message
from safetensors.torch import load_file

LONGER = ["--total_episodes", "32"]  # four updates on two ranks


@pytest.mark.parametrize("script, saved, flags", [
    pytest.param("rebel.py", ["adapter_model.safetensors"], [], marks=pytest.mark.slow),
    pytest.param("rloo.py", ["model.safetensors"], ["--no-lora", "--lr", "1e-4"], marks=pytest.mark.slow),
    # The critic (LoRA, merged on saving) is saved as a reward model in <output_dir>/critic.
    pytest.param("ppo.py", ["adapter_model.safetensors", "critic/model.safetensors"], [], marks=pytest.mark.slow),
])  # fmt: skip
def test_sharded_run_matches_ddp(toy, tmp_path, script, saved, flags):
    weights = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / f"{mode}_out"
        run_script(script, *toy.rl_flags, *LONGER, *flags, *(["--fsdp"] if mode == "fsdp" else []),
                   "--run_dir", str(tmp_path / mode), "--output_dir", str(out), torchrun=2)  # fmt: skip
        weights[mode] = {f"{file}:{name}": t for file in saved for name, t in load_file(out / file).items()}
    assert sorted(weights["ddp"]) == sorted(weights["fsdp"])
    for name, tensor in weights["ddp"].items():
        assert (weights["fsdp"][name] - tensor).abs().max() < 1e-4, name
    ddp, fsdp = course(tmp_path / "ddp"), course(tmp_path / "fsdp")
    assert [r["update"] for r in fsdp] == [1, 2, 3, 4]
    for a, b in zip(ddp, fsdp):
        assert abs(a["loss/policy"] - b["loss/policy"]) < 1e-3 * max(1.0, abs(a["loss/policy"]))


@pytest.mark.slow
def test_sharded_full_finetuning_resumes_exactly(toy, tmp_path):
    flags = [*toy.rl_flags, "--total_episodes", "56", "--eval_freq", "3", "--no-lora", "--lr", "1e-4", "--fsdp"]
    check_resume_is_exact("rebel.py", flags, tmp_path, signal.SIGKILL, torchrun=2)


def test_fsdp_needs_torchrun(toy, tmp_path):
    message = bad_input_message("rebel.py", [*toy.rl_flags, "--fsdp", "--run_dir", str(tmp_path / "run")])
    assert "--fsdp needs torchrun" in message


@pytest.mark.slow
def test_sharded_sft_matches_ddp(toy, tmp_path):
    flags = ["--query_dataset", toy.tldr, "--base_model", toy.base, "--batch_size", "32", "--num_eval_prompts", "8",
             "--per_device_train_batch_size", "16", "--lr", "3e-3", "--query_length", "64", "--response_length", "24"]  # fmt: skip
    weights = {}
    for mode in ("ddp", "fsdp"):
        run_script("sft.py", *flags, *(["--fsdp"] if mode == "fsdp" else []), "--run_dir", str(tmp_path / mode),
                   "--output_dir", str(tmp_path / f"{mode}_out"), torchrun=2)  # fmt: skip
        weights[mode] = load_file(tmp_path / f"{mode}_out" / "model.safetensors")
    for name, tensor in weights["ddp"].items():
        assert (weights["fsdp"][name] - tensor).abs().max() < 1e-4, name
    assert abs(course(tmp_path / "ddp")[-1]["eval/loss"] - course(tmp_path / "fsdp")[-1]["eval/loss"]) < 1e-4


@pytest.mark.slow
def test_sharded_reward_model_matches_ddp(toy, tmp_path):
    """reward.py: the backbone's layers sharded under a root that owns the new head (broadcast from rank 0), trained
    with two micro-batches per step on per-batch trimmed pairs; odd evaluation and normalisation counts, which every
    rank must share equally (a sharded forward is a collective)."""
    flags = ["--query_dataset", toy.tldr, "--preference_dataset", toy.preference, "--sft_model_path", toy.sft,
             "--batch_size", "32", "--per_device_train_batch_size", "8", "--lr", "3e-3", "--query_length", "64",
             "--response_length", "24", "--pad_multiple", "8", "--num_eval_prompts", "9", "--num_norm_examples", "9"]  # fmt: skip
    weights, config = {}, {}
    for mode in ("ddp", "fsdp"):
        run_script("reward.py", *flags, *(["--fsdp"] if mode == "fsdp" else []), "--run_dir", str(tmp_path / mode),
                   "--output_dir", str(tmp_path / f"{mode}_out"), torchrun=2)  # fmt: skip
        weights[mode] = load_file(tmp_path / f"{mode}_out" / "model.safetensors")
        config[mode] = json.loads((tmp_path / f"{mode}_out" / "config.json").read_text())
    assert sorted(weights["ddp"]) == sorted(weights["fsdp"]) and "score.weight" in weights["fsdp"]
    for name, tensor in weights["ddp"].items():
        assert (weights["fsdp"][name] - tensor).abs().max() < 1e-4, name
    assert abs(config["ddp"]["reward_bias"] - config["fsdp"]["reward_bias"]) < 1e-4
    ddp, fsdp = course(tmp_path / "ddp"), course(tmp_path / "fsdp")
    assert [r["update"] for r in fsdp] == [*range(1, 9), 8]  # eight updates, then the evaluation
    for a, b in zip(ddp, fsdp):
        for key in ("loss/reward", "eval/loss"):
            assert abs(a.get(key, 0.0) - b.get(key, 0.0)) < 1e-4, (key, a, b)


def test_reward_fsdp_needs_torchrun(toy, tmp_path):
    flags = ["--query_dataset", toy.tldr, "--preference_dataset", toy.preference, "--sft_model_path", toy.sft]
    message = bad_input_message("reward.py", [*flags, "--fsdp", "--run_dir", str(tmp_path / "run")])
    assert "--fsdp needs torchrun" in message
