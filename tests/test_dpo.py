"""dpo.py: Equation 7 of Rafailov et al. (2023) on hand-picked numbers, the reference is the SFT policy, the helpers are
rebel.py's, and end-to-end runs on the toy task."""

import math

import pytest
import torch
from conftest import check_end_to_end, check_fails_with, check_ranks_in_sync, run_script
from rl_checks import run_in_process, sequence_logprob

import dpo

# ---------------------------------------------------------------------------------------------- the loss


def test_dpo_loss_closed_form():
    logprobs = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])  # chosen, rejected
    ref_logprobs = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    # log-ratio margins (chosen - rejected): (1 - (-1)) = 2 and (0 - 1) = -1; -ln sigmoid(z) = ln(1 + exp(-z))
    expected = (math.log1p(math.exp(-0.05 * 2)) + math.log1p(math.exp(0.05 * 1))) / 2
    assert dpo.dpo_loss(logprobs, ref_logprobs, beta=0.05).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_loss_sign_rewards_the_chosen_response():
    """The margin is beta * (log-ratio of the chosen - log-ratio of the rejected): favouring y_w lowers the loss."""
    ref = torch.tensor([[-3.0, -3.0]])
    chosen_up = torch.tensor([[-1.0, -3.0]])  # log-ratios (2, 0): margin +2
    rejected_up = torch.tensor([[-3.0, -1.0]])  # log-ratios (0, 2): margin -2
    assert dpo.dpo_loss(chosen_up, ref, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert dpo.dpo_loss(rejected_up, ref, beta=0.5).item() == pytest.approx(math.log1p(math.exp(1.0)))
    # Only the log-ratios matter: shifting pi_theta and pi_ref of one response together changes nothing.
    assert dpo.dpo_loss(chosen_up - 4, ref - 4, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))


def test_dpo_loss_at_the_reference_is_ln2_and_pushes_chosen_up():
    logprobs = torch.tensor([[-4.0, -5.0]], requires_grad=True)
    loss = dpo.dpo_loss(logprobs, logprobs.detach(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.05, 0.05]]))  # -beta * sigmoid(0) * (+1, -1)


def test_per_batch_padding_leaves_the_loss_unchanged(toy):
    """A micro-batch of pairs trimmed as dpo.py trims it (--pad_multiple 8) has the log-probs, and so the DPO loss, of
    the same pairs padded to --query_length + --response_length (--pad_multiple 0)."""
    from transformers import AutoModelForCausalLM

    tokenizer, model = dpo.load_tokenizer(toy.sft), AutoModelForCausalLM.from_pretrained(toy.sft).eval()
    pad = tokenizer.pad_token_id
    columns_and_lengths = ("query", "chosen", "rejected", tokenizer, (64, 40), "filter", False)
    pairs = dpo.load_preferences(toy.preference, "train", *columns_and_lengths)[0][:4]  # (4, 2, 104)
    logprobs = []
    for multiple in (0, 8):
        batch, context_length = dpo.trim_padding(pairs, 64, pad, multiple)
        masks = dpo.response_mask(batch[:, :, context_length:].flatten(0, 1), pad).unflatten(0, (-1, 2))
        with torch.no_grad():
            logprobs.append(dpo.sequence_logprobs(model, batch, masks, context_length, 1.0, pad))
    assert context_length < 64 and batch.size(-1) - context_length < 40  # both sides trimmed
    torch.testing.assert_close(logprobs[1], logprobs[0], atol=1e-5, rtol=1e-5)
    ref = logprobs[0] + torch.tensor([[0.3, -0.2]])  # any reference: the loss is a function of the log-probs
    torch.testing.assert_close(dpo.dpo_loss(logprobs[1], ref, 0.5), dpo.dpo_loss(logprobs[0], ref, 0.5))


# ---------------------------------------------------------------------------------------------- end to end


def _flags(toy):
    return [*toy.rl_flags, "--preference_dataset", toy.preference]


def check_pair_reference_is_sft(g: dict, sft_path: str) -> None:
    """The last update's reference log-probs are those of the SFT checkpoint, loaded here on its own and scored one
    sequence at a time; the policy's are not (it has taken a step), so a policy used as its own reference fails."""
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(sft_path).eval()
    rows = g["query_responses"].flatten(0, 1)  # (2B, L): chosen, rejected, chosen, ...
    expected = torch.tensor([sequence_logprob(sft, row, g["args"].query_length, g["pad"], 1.0) for row in rows])
    torch.testing.assert_close(g["ref_logprobs"], expected.view(-1, 2), atol=2e-3, rtol=1e-4)
    moved = (g["logprobs"] - g["ref_logprobs"]).abs().max()
    assert moved > 0.02, f"the policy moved by {moved} only: too little to tell it from its reference"


def test_end_to_end_with_tracking(toy, tmp_path):
    import pandas as pd
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = check_end_to_end("dpo.py", _flags(toy), tmp_path, ("objective/implicit_accuracy",))
    assert rows[0]["loss/policy"] == pytest.approx(math.log(2), abs=1e-5)  # the first step starts at the reference
    table = pd.read_csv(tmp_path / "run" / "eval_000002.csv")
    assert {"query", "postprocessed_response", "reference_response", "score", "reference_score", "kl"} <= set(table)
    assert len(table) == 8
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy.sft), str(tmp_path / "out"))  # adapter loads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_is_the_sft_policy(toy, tmp_path, lora):
    """LoRA: the reference is the adapter switched off; --no-lora: a frozen copy of the SFT checkpoint. The pairs are
    trimmed per micro-batch (--pad_multiple 8), and the log-probs are checked against untrimmed rows."""
    flags = [*_flags(toy), "--output_dir", "", "--run_dir", str(tmp_path / "run"), "--lr", "3e-2"]
    flags += ["--pad_multiple", "8"]
    g = run_in_process("dpo.py", flags if lora else [*flags, "--no-lora"])
    assert g["context_length"] < g["args"].query_length  # the last micro-batch was trimmed
    check_pair_reference_is_sft(g, toy.sft)


def test_pad_outside_the_embedding(toy, tmp_path):
    """A tokenizer whose pad is its EOS: load_tokenizer adds a pad id past the embedding, and the right-padded
    preference responses must never feed it to the model nor gather its log-prob."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.sft)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_path / "sft")
    model = AutoModelForCausalLM.from_pretrained(toy.sft)
    model.save_pretrained(tmp_path / "sft")
    flags = _flags(toy)
    flags[flags.index("--sft_model_path") + 1] = str(tmp_path / "sft")
    g = run_in_process("dpo.py", [*flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"), "--lr", "3e-2"])
    assert g["pad"] >= model.get_input_embeddings().num_embeddings
    assert (g["query_responses"][..., g["args"].query_length :] == g["pad"]).any()  # right-padded responses
    check_pair_reference_is_sft(g, str(tmp_path / "sft"))


def test_each_epoch_is_the_whole_batches_of_the_pairs(toy, tmp_path):
    """--num_train_epochs 2 over 12 pairs in batches of 8: each pass over the shuffled pairs yields one whole batch
    (the remainder is dropped), so 2 updates, and not the 3 that 2 * 12 / 8 would start."""
    import json

    rows = [{"query": f"q {i} ?\n\nTL;DR:", "chosen": f"a {i}", "rejected": f"b {i} c"} for i in range(12)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    flags = [*toy.rl_flags, "--preference_dataset", str(tmp_path / "pairs.jsonl"), "--num_train_epochs", "2"]
    del flags[flags.index("--total_episodes") : flags.index("--total_episodes") + 2]
    g = run_in_process("dpo.py", [*flags, "--output_dir", "", "--run_dir", str(tmp_path / "run")])
    assert g["num_updates"] == 2 and g["update"] == 2


def test_help():
    out = run_script("dpo.py", "--help").stdout
    assert "--beta" in out and "--preference_dataset" in out and "--chosen_column" in out and "Eq. 7" in out
    assert "--temperature" not in out  # DPO samples only to evaluate, at --eval_temperature


@pytest.mark.slow
def test_torchrun_two_ranks_stay_in_sync_in_bf16(toy, tmp_path):
    check_ranks_in_sync("dpo.py", [*_flags(toy), "--precision", "bf16"], tmp_path / "run")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "6"], "is not divisible by"),
        (["--beta", "-1"], "--beta must be > 0"),
        (["--chosen_column", "nope"], "has no column 'nope'"),
        (["--total_episodes", "4"], "smaller than one --batch_size"),
    ],
    ids=["batch", "beta", "column", "episodes"],
)
def test_bad_input(toy, tmp_path, flags, message):
    check_fails_with("dpo.py", [*_flags(toy), *flags], message, tmp_path)
