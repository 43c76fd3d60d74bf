"""sft.py and reward.py (losses, saved formats, errors), the toy task's judge, and REBEL learning on the toy task."""

import ast
import json
import math
import os
import re

import pytest
import torch
from conftest import LENGTHS, read_metrics, run_script
from eval_helpers import tiny_llama_config
from safetensors.torch import load_file

import rebel
import reward
import sft
from toy.tldr import gold_judge, gold_score, make_post, make_splits, make_summary, parse_post


def test_bradley_terry_loss_hand_computed():
    rewards = torch.tensor([[2.0, 1.0], [0.0, 0.5]])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2
    assert reward.bradley_terry_loss(rewards).item() == pytest.approx(expected)


def test_sft_loss_only_on_response_tokens(toy):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(toy.sft).eval()
    pad = 1
    x = torch.tensor([[pad, 5, 6, 7, 8, 0, pad]])  # query (left pad) 3 tokens + response [8, EOS] + pad
    loss = sft.sft_loss(model, x, 4, pad)
    logits = model(torch.tensor([[5, 6, 7, 8, 0]])).logits[0]
    naive = -(logits[2].log_softmax(-1)[8] + logits[3].log_softmax(-1)[0]) / 2
    assert loss.item() == pytest.approx(naive.item(), abs=1e-4)


def test_trim_padding_by_hand():
    pad = 9
    x = torch.tensor([[9, 9, 1, 2, 3, 4, 9, 9], [9, 9, 9, 5, 6, 9, 9, 9]])  # prompts of 4 columns, responses of 4
    trimmed, context_length = sft.trim_padding(x, 4, pad, 1)
    assert trimmed.tolist() == [[1, 2, 3, 4], [9, 5, 6, 9]] and context_length == 2
    trimmed, context_length = sft.trim_padding(x, 4, pad, 3)  # 3 columns each side: never more than there are
    assert trimmed.tolist() == [[9, 1, 2, 3, 4, 9], [9, 9, 5, 6, 9, 9]] and context_length == 3
    assert sft.trim_padding(x, 4, pad, 0)[0] is x and sft.trim_padding(x, 4, pad, 64)[0].shape == (2, 8)
    pairs, _ = sft.trim_padding(torch.stack((x, x.flip(0)), 1), 4, pad, 1)  # (B, 2, L): every sequence counts
    assert pairs.shape == (2, 2, 4) and pairs[:, 0].tolist() == [[1, 2, 3, 4], [9, 5, 6, 9]]


def test_trim_padding_is_one_helper():
    """sft.py, reward.py and dpo.py trim their training batches with the same helper (not in rebel.py, whose batches
    of prompts trim_left_padding trims), so the skeleton test does not compare these copies: this does."""
    assert _definitions("sft.py")["trim_padding"] == _definitions("reward.py")["trim_padding"]
    assert _definitions("sft.py")["trim_padding"] == _definitions("dpo.py")["trim_padding"]


def _pairs(toy, tokenizer, n: int = 4):
    """n preference pairs of the toy task as the scripts lay them out: (n, 2, 64 + 40), the prompt left-padded to 64
    tokens and each response right-padded to 40 (longer than any, so that there is right padding to drop)."""
    columns = ("query", "chosen", "rejected")
    pairs, _ = reward.load_preferences(toy.preference, "train", *columns, tokenizer, (64, 40), "filter", False)
    return pairs[:n]


def test_per_batch_padding_leaves_the_sft_loss_unchanged(toy):
    """sft.py's training loss on a micro-batch is the same whether or not it is trimmed (--pad_multiple 8 against 0)."""
    from transformers import AutoModelForCausalLM

    tokenizer, model = sft.load_tokenizer(toy.sft), AutoModelForCausalLM.from_pretrained(toy.sft).eval()
    pad, batch = tokenizer.pad_token_id, _pairs(toy, tokenizer)[:, 0]  # (4, 104): prompts and chosen responses
    trimmed, context_length = sft.trim_padding(batch, 64, pad, 8)
    assert context_length < 64 and trimmed.size(1) - context_length < 40  # both sides trimmed
    assert sft.trim_padding(batch, 64, pad, 0) == (batch, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            sft.sft_loss(model, trimmed, context_length, pad), sft.sft_loss(model, batch, 64, pad), atol=1e-5, rtol=1e-5
        )


def test_per_batch_padding_leaves_the_reward_model_loss_unchanged(toy):
    """reward.py's scores, and so its Bradley-Terry loss, on a micro-batch of pairs are the same whether or not it is
    trimmed (--pad_multiple 8 against 0)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer, hf_model = reward.load_tokenizer(toy.rm), AutoModelForSequenceClassification.from_pretrained(toy.rm)
    model, pad = reward.ScalarRewardModel(hf_model.base_model, hf_model.score).eval(), tokenizer.pad_token_id
    pairs = _pairs(toy, tokenizer)  # (4, 2, 104)
    trimmed, context_length = reward.trim_padding(pairs, 64, pad, 8)
    assert context_length < 64 and trimmed.size(-1) - context_length < 40
    with torch.no_grad():
        full, cut = (model(x.flatten(0, 1), pad).view(-1, 2) for x in (pairs, trimmed))
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reward.bradley_terry_loss(cut), reward.bradley_terry_loss(full), atol=1e-6, rtol=1e-6)


def _definitions(path) -> dict:
    with open(path) as f:
        src = f.read()
    return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body if hasattr(n, "name")}


@pytest.mark.parametrize("script", ["sft.py", "reward.py"])
def test_shared_helpers_are_copied_from_rebel(script):
    """Every top-level helper that also exists in rebel.py is the same text (Args and main excepted: they hold each
    script's own flags and loop)."""
    ours, theirs = _definitions(script), _definitions("rebel.py")
    shared = sorted(set(ours) & set(theirs) - {"Args", "main"})
    assert {"forward", "load_tokenizer", "load_prompts", "load_policy"} <= set(shared)
    assert [n for n in shared if ours[n] != theirs[n]] == []


def test_saved_models_load_in_the_formats_rebel_reads(toy):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.sft)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    AutoModelForCausalLM.from_pretrained(toy.sft)
    rm = AutoModelForSequenceClassification.from_pretrained(toy.rm)
    assert rm.config.num_labels == 1 and isinstance(rm.config.reward_bias, float)
    assert rebel.load_reward_model(toy.rm, torch.float32).bias == rm.config.reward_bias
    metrics = [json.loads(x) for x in (toy.dir / "runs/rm/metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in metrics[-1] and metrics[-1]["eval/reference_score_before_norm"] == rm.config.reward_bias


def _reference_scores(rm_path, dataset) -> torch.Tensor:
    """rebel.py's reward model's scores of the train split's reference responses, as reward.py tokenises them."""
    tokenizer = rebel.load_tokenizer(rm_path)
    _, _, queries, references, _ = rebel.load_prompts(
        dataset, "train", "query", "reference_response", tokenizer, 64, 24, "filter"
    )
    model = rebel.load_reward_model(rm_path, torch.float32).eval()
    with torch.no_grad():
        return model(torch.cat((queries, references), 1), tokenizer.pad_token_id)


def test_reward_model_scores_references_zero_on_average(toy):
    """reward.py saves the references' mean score as config.reward_bias; rebel.py subtracts it (the paper's scale)."""
    scores = _reference_scores(toy.rm, toy.tldr)
    assert abs(scores.mean().item()) < 1e-3 and scores.std().item() > 1e-3


def test_pad_token_outside_the_embedding(toy, tmp_path):
    """A Llama-architecture base whose embedding has exactly len(tokenizer) rows and whose tokenizer pads with EOS:
    load_tokenizer adds a pad token with no embedding row. sft.py, then reward.py from a LoRA adapter of the SFT model,
    train, and what they save loads (the config's pad id must stay inside the embedding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(toy.base)
    tokenizer.pad_token = tokenizer.eos_token
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )
    config = tiny_llama_config(len(tokenizer), **ids)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    assert rebel.load_tokenizer(str(tmp_path / "base")).pad_token_id == len(tokenizer)  # no embedding row

    small = ["--batch_size", "32", "--per_device_train_batch_size", "16", "--lr", "3e-3", *LENGTHS]
    sft_flags = ["--query_dataset", toy.tldr, "--base_model", str(tmp_path / "base"), "--run_dir", str(tmp_path / "s")]
    run_script("sft.py", *small, *sft_flags, "--output_dir", str(tmp_path / "sft"))
    sft_model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    assert sft_model.config.pad_token_id < sft_model.get_input_embeddings().num_embeddings
    # A LoRA adapter of the SFT model (with its tokenizer), as rebel.py saves: reward.py merges it into its base.
    lora = get_peft_model(sft_model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tmp_path / "sft").save_pretrained(tmp_path / "adapter")
    rm_flags = ["--query_dataset", toy.tldr, "--preference_dataset", toy.preference, "--run_dir", str(tmp_path / "r")]
    run_script(
        "reward.py",
        *small,
        *rm_flags,
        "--sft_model_path",
        str(tmp_path / "adapter"),
        "--output_dir",
        str(tmp_path / "rm"),
    )
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    assert rm.config.pad_token_id is None or rm.config.pad_token_id < rm.get_input_embeddings().num_embeddings
    assert abs(_reference_scores(str(tmp_path / "rm"), toy.tldr).mean().item()) < 1e-3


@pytest.mark.parametrize("script, flags, message", [
    ("sft.py", ["--reference_column", "summary"], "has no column 'summary'"),
    ("sft.py", ["--batch_size", "30"], "not divisible"),
    ("reward.py", ["--chosen_column", "good"], "has no column 'good'"),
])  # fmt: skip
def test_bad_input(toy, tmp_path, script, flags, message):
    model = ["--base_model", toy.base] if script == "sft.py" else ["--sft_model_path", toy.sft]
    data = ["--query_dataset", toy.tldr, *(["--preference_dataset", toy.preference] if script == "reward.py" else [])]
    small = [
        "--batch_size",
        "32",
        "--per_device_train_batch_size",
        "16",
        "--output_dir",
        "",
        "--run_dir",
        str(tmp_path),
    ]
    proc = run_script(script, *data, *model, *small, *flags, check=False)
    assert proc.returncode != 0 and message in proc.stdout


def test_gold_judge_rewards_facts_and_penalises_the_rest():
    import random

    post = make_post(random.Random(3))
    q, p = post["query"], parse_post(post["query"])
    assert p["person"] == post["person"] and p["event"] == post["event"] and p["feeling"] == post["feeling"]
    best = f"my {p['person']} {p['event']} . i feel {p['feeling']} . {p['question']}"
    assert gold_score(q, best) == 4.0
    assert gold_score(q, best + " " + post["fillers"][0]) < 4.0  # filler
    assert gold_score(q, best + f" my {p['person']} {p['event']} .") < 4.0  # repetition
    assert gold_score(q, best.removesuffix(" ?")) < 4.0  # stops mid-sentence
    assert gold_judge(q, best, "i feel fine .") == 1.0 and gold_judge(q, "i feel fine .", best) == 0.0
    assert gold_judge(q, best, best) == 0.5


def test_references_are_mediocre_and_preferences_follow_the_judge():
    sft_splits, pref = make_splits(0, 400, 10, 10, 400)
    ref = [gold_score(r["query"], r["reference_response"]) for r in sft_splits["train"]]
    assert 1.0 < sum(ref) / len(ref) < 2.5  # far from the best possible 4.0: room to improve
    agree = [gold_score(r["query"], r["chosen"]) >= gold_score(r["query"], r["rejected"]) for r in pref["train"]]
    assert 0.6 < sum(agree) / len(agree) < 0.95  # labels follow the judge, with Bradley-Terry noise
    assert make_splits(0, 5, 1, 1, 5) == make_splits(0, 5, 1, 1, 5)  # deterministic
    assert make_summary(make_post(__import__("random").Random(0)), __import__("random").Random(0)).startswith(" ")


@pytest.mark.slow
def test_rebel_learns_on_the_toy_task(tmp_path):
    """The main job in miniature: on 256 held-out prompts REBEL's gold win rate beats SFT's by > 3 standard errors."""
    from toy.demo import run_seed

    result = run_seed(str(tmp_path), seed=1)
    sft_, rebel_ = result["sft"], result["rebel"]
    se = math.hypot(sft_["win_rate_se"], rebel_["win_rate_se"])
    assert rebel_["win_rate"] - sft_["win_rate"] > 3 * se, result
    assert rebel_["gold_score"] > sft_["gold_score"]


def _saved_weights(path) -> dict:
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_torchrun_two_ranks(toy, tmp_path):
    """reward.py on two ranks takes the same steps as one process with the same global batch (its loss is a mean over
    pairs, so splitting the batch over ranks changes nothing) and finds the same reference mean; on both scripts the
    exit probe (tests/exit_probe/) finds the ranks' weights equal, and rank 0 alone logs each update."""
    small = ["--batch_size", "32", "--per_device_train_batch_size", "16", "--lr", "3e-3", *LENGTHS]  # as toy.rm's
    rm_flags = ["--query_dataset", toy.tldr, "--preference_dataset", toy.preference, "--sft_model_path", toy.sft]
    rm_flags += ["--run_dir", str(tmp_path / "runs/rm"), "--output_dir", str(tmp_path / "rm")]
    proc = run_script("reward.py", *small, *rm_flags, torchrun=2)
    assert re.findall(r"ddp max param diff across ranks: ([0-9.eE+-]+)", proc.stdout) == ["0.0", "0.0"], proc.stdout[
        -3000:
    ]
    one, two, start = _saved_weights(toy.rm), _saved_weights(tmp_path / "rm"), _saved_weights(toy.sft)
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    assert moved > 1e-3 and gap < 1e-3 * moved, (gap, moved)
    bias_one, bias_two = (
        json.load(open(os.path.join(p, "config.json")))["reward_bias"] for p in (toy.rm, tmp_path / "rm")
    )
    assert bias_two == pytest.approx(bias_one, abs=1e-3 * moved)

    sft_flags = ["--query_dataset", toy.tldr, "--base_model", toy.base, "--run_dir", str(tmp_path / "runs/sft")]
    proc = run_script("sft.py", *small, *sft_flags, "--output_dir", "", torchrun=2)
    assert re.findall(r"ddp max param diff across ranks: ([0-9.eE+-]+)", proc.stdout) == ["0.0", "0.0"], proc.stdout[
        -3000:
    ]
    updates = [r["update"] for r in read_metrics(tmp_path / "runs/sft") if "loss/sft" in r]
    assert updates == list(range(1, len(updates) + 1)) and len(updates) == 8  # 256 examples / 32 per update
