"""sft.py and reward.py (losses, saved formats, errors), the toy task's judge, and REBEL learning on the toy task."""

import json
import math
import os

import pytest
import torch
from conftest import LENGTHS, read_metrics, run_script
from safetensors.torch import load_file

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


def test_saved_models_load_in_the_formats_rebel_reads(toy):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.sft)
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    AutoModelForCausalLM.from_pretrained(toy.sft)
    rm = AutoModelForSequenceClassification.from_pretrained(toy.rm)
    assert rm.config.num_labels == 1
    metrics = [json.loads(x) for x in (toy.dir / "runs/rm/metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in metrics[-1]


def test_sft_adds_a_pad_token_to_pythia_like_tokenizers(toy, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.base)
    tok.pad_token = None
    sft.ensure_pad_token(tok)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id


@pytest.mark.parametrize("script, flags, message", [
    ("sft.py", ["--reference_column", "summary"], "has no column 'summary'"),
    ("sft.py", ["--batch_size", "30"], "not divisible"),
    ("reward.py", ["--chosen_column", "good"], "has no column 'good'"),
])  # fmt: skip
def test_bad_input(toy, tmp_path, script, flags, message):
    data = toy.tldr if script == "sft.py" else toy.preference
    model = ["--base_model", toy.base] if script == "sft.py" else ["--sft_model_path", toy.sft]
    proc = run_script(script, "--query_dataset", data, *model, "--batch_size", "32", "--per_device_train_batch_size", "16",
                      "--output_dir", "", "--run_dir", str(tmp_path), *flags, check=False)  # fmt: skip
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


def test_torchrun_two_ranks(toy, tmp_path):
    """reward.py on two ranks takes the same steps as one process with the same global batch (its loss is a mean over
    pairs, so splitting the batch over ranks changes nothing); sft.py's two ranks stay in sync."""
    small = ["--batch_size", "32", "--per_device_train_batch_size", "16", "--lr", "3e-3", *LENGTHS]  # as toy.rm's
    run_script("reward.py", *small, "--query_dataset", toy.preference, "--sft_model_path", toy.sft,
               "--output_dir", str(tmp_path / "rm"), "--run_dir", str(tmp_path / "runs/rm"), torchrun=2)  # fmt: skip
    one, two, start = _saved_weights(toy.rm), _saved_weights(tmp_path / "rm"), _saved_weights(toy.sft)
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max((one[k] - start[k]).abs().max().item() for k in one if k in start)
    assert moved > 1e-3 and gap < 1e-3 * moved, (gap, moved)
    assert read_metrics(tmp_path / "runs/rm")[-2] == {"ddp/max_param_diff_across_ranks": 0.0}

    run_script("sft.py", *small, "--query_dataset", toy.tldr, "--base_model", toy.base, "--output_dir", "",
               "--run_dir", str(tmp_path / "runs/sft"), torchrun=2)  # fmt: skip
    rows = read_metrics(tmp_path / "runs/sft")
    assert rows[-2] == {"ddp/max_param_diff_across_ranks": 0.0}
    assert [r["update"] for r in rows[:-2]] == list(range(1, len(rows) - 1))  # logged once per update, by rank 0
