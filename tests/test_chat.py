"""The paper's general-chat setting (Section 4.2, Appendix I.2) on a tiny chat task built from configs (chat_task.py):
a Llama policy with a Llama-3-like chat template and pad == EOS, a GPT-NeoX reward model with another tokenizer and a
Human/Assistant template, conversation data. Checked: prompts rendered with the policy's template, the exact text the
reward model reads, stop tokens, last-N-layer training and its reference, best-vs-worst pairs, reward functions, and
the AlpacaEval / MT-Bench hooks on the trained policy."""

import json
import math
import os

import pandas as pd
import pytest
import torch
from chat_task import build_chat_task
from conftest import read_metrics, run_script
from eval_helpers import build_cycling_llama
from rl_checks import bad_input_message
from safetensors.torch import load_file

import eval.alpaca_eval_hook as alpaca_eval_hook
import eval.mt_bench_hook as mt_bench_hook
import rebel

QUESTION = [{"role": "user", "content": "what is the capital of france ?"}]


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return build_chat_task(tmp_path_factory.mktemp("chat"))


def chat_flags(chat) -> list[str]:
    """A two-update REBEL run in the paper's chat configuration, scaled down."""
    return ["--query_dataset", chat.data, "--query_column", "messages", "--reference_column", "messages",
            "--sft_model_path", chat.policy, "--reward_model_path", chat.reward_model, "--stop_at_eos",
            "--query_length", "64", "--response_length", "16", "--batch_size", "8", "--per_device_train_batch_size",
            "4", "--local_rollout_forward_batch_size", "8", "--total_episodes", "16", "--num_eval_prompts", "8",
            "--eval_freq", "0", "--lr", "1e-3", "--precision", "bf16"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- pure helpers


def test_pairs_adjacent_and_best_worst_by_hand():
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.3], [2.0, 1.0, 3.0, -1.0]])
    assert rebel.pair_up(scores, "adjacent").tolist() == [[[0, 1], [2, 3]], [[0, 1], [2, 3]]]
    assert rebel.pair_up(scores, "best_worst").tolist() == [[[1, 2]], [[2, 3]]]  # (best, worst) of each prompt
    # All tied (every response without EOS gets the same penalty): still two distinct responses, whose rewards then
    # differ by their KL terms; a response paired with itself would regress 0 onto 0.
    tied = torch.tensor([[-1.0, -1.0, -1.0], [0.5, 2.0, 2.0]])
    assert [sorted(set(p)) == sorted(p) for (p,) in rebel.pair_up(tied, "best_worst").tolist()] == [True, True]


def test_take_pairs_lays_each_prompts_pairs_out_in_order():
    """take_pairs: (B, m, ...) by pair_up's (B, P, 2) -> (B * P, 2, ...), prompt b's pair p at row b * P + p, trailing
    dimensions kept; Algorithm 1's single pair [0, 1] gives the tensor back as it is."""
    t = torch.arange(2 * 4 * 3).view(2, 4, 3)  # B = 2 prompts, m = 4 responses, 3 values each
    pairs = torch.tensor([[[0, 1], [3, 2]], [[2, 0], [1, 3]]])
    expected = [[t[0, 0], t[0, 1]], [t[0, 3], t[0, 2]], [t[1, 2], t[1, 0]], [t[1, 1], t[1, 3]]]
    assert rebel.take_pairs(t, pairs).tolist() == [[a.tolist(), b.tolist()] for a, b in expected]
    assert torch.equal(rebel.take_pairs(t[:, :2], torch.tensor([[[0, 1]]] * 2)), t[:, :2])


def test_prompts_as_messages():
    assert rebel.as_messages("hi there") == [{"role": "user", "content": "hi there"}]
    nectar = "\n\nHuman: how do I bake bread?\n\nAssistant: With flour.\n\nHuman: and yeast?\n\nAssistant:"
    assert rebel.as_messages(nectar) == [
        {"role": "user", "content": "how do I bake bread?"},
        {"role": "assistant", "content": "With flour."},
        {"role": "user", "content": "and yeast?"},
    ]
    answered = [*QUESTION, {"role": "assistant", "content": "paris .", "extra": 1}]
    assert rebel.as_messages(answered) == QUESTION  # the dataset's answer is not part of the prompt


def test_prompts_are_rendered_with_the_policy_chat_template(chat):
    tokenizer = rebel.load_tokenizer(chat.policy)
    data = dict(tokenizer=tokenizer, query_length=64, response_length=16, long_prompts="filter")
    rows, prompts, queries, references, dropped = rebel.load_prompts(
        chat.data, "validation", "messages", "messages", **data
    )
    assert len(prompts) == 16 and dropped == 0 and prompts[0] == rows[0]["messages"][:1]
    text = tokenizer.decode([t for t in queries[0].tolist() if t != tokenizer.pad_token_id])
    assert text.startswith("<|start_header_id|> user <|end_header_id|>")  # word-level decode joins tokens with spaces
    assert text.endswith("<|eot_id|> <|start_header_id|> assistant <|end_header_id|>")  # ready for the answer
    answer = tokenizer.decode(
        [t for t in references[0].tolist() if t != tokenizer.pad_token_id], skip_special_tokens=True
    )
    assert rows[0]["messages"][1]["content"].startswith(answer)  # the conversation's answer (cut to 15 tokens + EOS)
    # A dataset answer (--mu dataset's y', a reference, DPO's pair) ends as the template renders the assistant's turn
    # and as the policy ends its own: '.', '<|eot_id|>', not the EOS '<|endoftext|>' the policy never ends an answer with
    pad, eot = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(chat.eot)
    for row, query, reference in zip(rows, queries.tolist(), references.tolist()):
        whole = tokenizer(tokenizer.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)
        prompt, answer = [t for t in query if t != pad], [t for t in reference if t != pad]
        assert answer[-1] == eot and whole.input_ids[-1] == eot
        if len(answer) < 16:  # not cut: the template's rendering of the whole conversation, token for token
            assert prompt + answer == whole.input_ids
    # the same prompts as plain text with --chat, and 1 token too short a limit drops the longest
    _, text_prompts, text_queries, _, _ = rebel.load_prompts(chat.data, "validation", "prompt", None, **data, chat=True)
    assert text_prompts == prompts and torch.equal(text_queries, queries)
    longest = int((queries != tokenizer.pad_token_id).sum(1).max())
    dropped = rebel.load_prompts(
        chat.data, "validation", "prompt", None, **{**data, "query_length": longest - 1}, chat=True
    )[-1]
    assert dropped >= 1


def test_the_reward_model_reads_its_own_template_and_tokens(chat, monkeypatch):
    """A response sampled in the policy's tokens reaches the reward model as the text a user would write down, in the
    reward model's template and vocabulary; its score is the one the reward model gives that text directly."""
    from transformers import AutoModelForSequenceClassification

    tokenizer, rm_tokenizer = rebel.load_tokenizer(chat.policy), rebel.load_tokenizer(chat.reward_model)
    assert not rebel.same_tokenizer(tokenizer, rm_tokenizer) and rebel.same_tokenizer(tokenizer, tokenizer)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    query = tokenizer(prompt, add_special_tokens=False).input_ids
    response = tokenizer("hello thanks . <|eot_id|>", add_special_tokens=False).input_ids
    pad = tokenizer.pad_token_id
    query_responses = torch.tensor(
        [[pad, pad, *query, *response, pad], [pad, pad, *query, *response[:2], pad, pad, pad]]
    )
    seen, render = [], rebel.reward_text
    monkeypatch.setattr(rebel, "reward_text", lambda *a: seen.append(render(*a)) or seen[-1])
    model = rebel.load_reward_model(chat.reward_model, torch.float32).eval()
    reward = rebel.Reward(tokenizer, model, rm_tokenizer)
    with torch.no_grad():
        scores = reward(query_responses, len(query) + 2, [QUESTION, QUESTION])
    assert seen == [
        "Human: what is the capital of france ?\n\nAssistant: hello thanks . </s>",
        "Human: what is the capital of france ?\n\nAssistant: hello thanks </s>",
    ]
    direct = AutoModelForSequenceClassification.from_pretrained(chat.reward_model).eval()
    for text, score in zip(seen, scores):
        with torch.no_grad():
            expected = direct(**rm_tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
        assert score.item() == pytest.approx(expected.item(), abs=1e-5)


def test_tokenizers_that_differ_only_in_their_pad_token_are_the_same(chat):
    """A reward model saved with another pad token than the policy's still reads the policy's ids (the fast path)."""
    from transformers import AutoTokenizer

    a, b = rebel.load_tokenizer(chat.policy), AutoTokenizer.from_pretrained(chat.policy)
    b.add_special_tokens({"pad_token": "[OTHER_PAD]"})  # where load_tokenizer put its <|pad|>
    assert b.pad_token != a.pad_token and rebel.same_tokenizer(a, b)
    b.add_tokens(["paris"])
    assert not rebel.same_tokenizer(a, b)


def test_a_reward_model_without_its_head_weights_is_refused(chat, tmp_path):
    from transformers import AutoModel

    AutoModel.from_pretrained(chat.reward_model).save_pretrained(tmp_path / "backbone_only")  # e.g. a custom v_head
    config = json.loads((tmp_path / "backbone_only" / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForSequenceClassification"]
    (tmp_path / "backbone_only" / "config.json").write_text(json.dumps(config))
    with pytest.raises(rebel.BadInput, match="no weights for 1 parameters .* score.weight"):
        rebel.load_reward_model(str(tmp_path / "backbone_only"), torch.float32)


def test_a_reward_function_from_a_file(tmp_path):
    (tmp_path / "r.py").write_text("def length(prompts, responses):\n    return [len(r) for r in responses]\n")

    def load(spec):
        return rebel.load_reward(spec, "unused", None, None, torch.float32, "cpu")

    assert load(f"{tmp_path}/r.py:length").fn(["a", "b"], ["xyz", ""]) == [3, 0]
    with pytest.raises(rebel.BadInput, match="defines no function 'missing'"):
        load(f"{tmp_path}/r.py:missing")
    with pytest.raises(rebel.BadInput, match="give an existing file.py:function_name"):
        load(f"{tmp_path}/nope.py:length")


def test_stop_tokens_end_responses_early_at_the_same_length(tmp_path):
    """A Llama-3-like model stops on <|eot_id|> (its generation_config), not only on the tokenizer's EOS; with
    --stop_at_eos sampling ends there, the rest is padding, and the length stays response_length."""
    path = build_cycling_llama(str(tmp_path / "cycling"))
    tokenizer, model = rebel.load_tokenizer(path), rebel.load_policy(path, torch.float32).eval()
    stop_ids = rebel.stop_token_ids(tokenizer, model.generation_config)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop_ids == [tokenizer.eos_token_id, eot]
    query = tokenizer(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)).input_ids
    queries, pad = torch.tensor([query]), tokenizer.pad_token_id
    steps = []
    model.register_forward_hook(lambda *_: steps.append(1))
    config = rebel.sampling_config(12, 1e-4, pad, stop_ids=stop_ids)
    out = rebel.generate(model, queries, config)[:, len(query) :]
    assert out.shape == (1, 12) and out[0, :2].tolist() == [tokenizer.convert_tokens_to_ids("hello"), eot]
    assert (rebel.truncate_response(out, stop_ids, pad)[0, 2:] == pad).all() and len(steps) == 2  # stopped at once
    steps.clear()
    rebel.generate(model, queries, rebel.sampling_config(12, 1e-4, pad))  # TL;DR: min = max new tokens
    assert len(steps) == 12


def test_last_layers_train_and_their_reference_is_the_sft_policy(chat):
    """--num_trainable_layers 1: only the last layer, the final norm and the (untied) LM head train; with their starting
    weights swapped in, the policy's log-probs are exactly those of a separately loaded SFT policy."""
    policy = rebel.load_policy(chat.policy, torch.float32).eval()
    reference = rebel.train_last_layers(policy, 1, torch.float32)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == set(reference) and all(
        n.startswith(("model.layers.1.", "model.norm", "lm_head")) for n in trainable
    )
    assert any(n.startswith("model.layers.1.") for n in trainable) and "lm_head.weight" in trainable
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # as training would
    x, pad = torch.tensor([[5, 6, 7, 8, 9, 10]]), 149
    sft = rebel.load_policy(chat.policy, torch.float32).eval()
    with torch.no_grad(), rebel.weights_swapped(policy, reference) as ref:
        swapped = rebel.response_logprobs(ref, x, 2, 1.0, pad)
    expected = rebel.response_logprobs(sft, x, 2, 1.0, pad)
    torch.testing.assert_close(swapped, expected, atol=0, rtol=0)
    assert (
        rebel.response_logprobs(policy, x, 2, 1.0, pad) - expected
    ).abs().max() > 1e-3  # the trained weights are back


def test_bad_chat_flags(chat, tmp_path):
    flags = [*chat_flags(chat), "--run_dir", str(tmp_path / "run")]
    assert "--num_samples must be even" in bad_input_message("rebel.py", [*flags, "--num_samples", "3"])
    assert "add --no-lora" in bad_input_message("rebel.py", [*flags, "--num_trainable_layers", "1"])


# ---------------------------------------------------------------------------------------------- end to end


def test_rebel_chat_end_to_end_last_layers_best_worst_and_hooks(chat, tmp_path):
    """The paper's chat recipe in miniature (last layers trained, k samples paired best-vs-worst, responses ending at
    the stop tokens, a reward model of another family and vocabulary, bf16), then both evaluation hooks on its output."""
    out, run = tmp_path / "out", tmp_path / "run"
    run_script("rebel.py", *chat_flags(chat), "--no-lora", "--num_trainable_layers", "1", "--num_samples", "4",
               "--pairing", "best_worst", "--local_rollout_forward_batch_size", "2", "--output_dir", str(out),
               "--run_dir", str(run))  # fmt: skip
    rows = [r for r in read_metrics(run) if "update" in r]
    assert [r["update"] for r in rows] == [1, 2] and all(math.isfinite(v) for v in rows[-1].values())
    before, after = (pd.read_csv(run / f"eval_{u:06d}.csv", keep_default_na=False) for u in (0, 2))
    assert (before.kl == 0).all()
    # Each reference response is scored with its own prompt (the evaluation runs in chunks of 2 prompts here).
    rm_tokenizer = rebel.load_tokenizer(chat.reward_model)
    rm = rebel.load_reward_model(chat.reward_model, torch.float32).eval()
    validation = [json.loads(line) for line in open(os.path.join(chat.data, "validation.jsonl"))][:8]
    for row, example in zip(before.itertuples(), validation):
        assert row.reference_response == example["messages"][1]["content"]
        text = rebel.reward_text(example["messages"][:1], row.reference_response, rm_tokenizer)
        with torch.no_grad():
            expected = rm(torch.tensor([rm_tokenizer(text, add_special_tokens=False).input_ids]), 1).item()
        assert abs(row.reference_score - expected) < 6e-3, (row.reference_score, expected)  # bf16 run, fp32 here
    assert after.response_length.max() <= 16
    start, trained = load_file(os.path.join(chat.policy, "model.safetensors")), load_file(out / "model.safetensors")
    bf16 = torch.bfloat16  # the frozen layers were loaded in bf16
    changed = {name for name in start if not torch.equal(start[name].to(bf16), trained[name].to(bf16))}
    assert changed and all(name.startswith(("model.layers.1.", "model.norm", "lm_head")) for name in changed)

    # The evaluation hooks generate from the saved policy with its chat template and stop tokens.
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "what is the capital of france ?", "dataset": "toy"}]))
    args = alpaca_eval_hook.Args(
        model_path=str(out), instructions=str(alpaca), output_dir=str(tmp_path), max_new_tokens=8
    )
    [answer] = json.loads(open(alpaca_eval_hook.main(args)).read())
    assert (
        answer["instruction"] == "what is the capital of france ?" and answer["output"] and answer["generator"] == "out"
    )
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["hello", "thanks"]}) + "\n")
    args = mt_bench_hook.Args(model_path=str(out), questions=str(questions), output_dir=str(tmp_path), max_new_tokens=8)
    [answer] = [json.loads(line) for line in open(mt_bench_hook.main(args))]
    assert answer["question_id"] == 81 and len(answer["choices"][0]["turns"]) == 2


@pytest.mark.slow
def test_rebel_on_a_gold_reward_function_raises_the_held_out_gold_score(tmp_path):
    """--reward_fn with the toy task's gold judge as a verifiable reward (no reward model): the gold score of the
    policy's summaries of 256 held-out prompts rises by more than 3 standard errors of the paired difference."""
    from toy.demo import REBEL_FLAGS, TOY_LENGTHS, prepare_seed, run
    from toy.tldr import gold_score

    d, _ = prepare_seed(str(tmp_path), seed=1)
    run("rebel.py", [*TOY_LENGTHS, *REBEL_FLAGS, "--seed", "1", "--query_dataset", f"{d}/data/tldr", "--sft_model_path",
                     f"{d}/sft", "--reward_fn", "toy/tldr.py:gold_reward", "--output_dir", "", "--run_dir",
                     f"{d}/runs/gold"], f"{d}/gold.log")  # fmt: skip
    evals = sorted((tmp_path / "seed1/runs/gold").glob("eval_*.csv"))
    first, last = (pd.read_csv(f, keep_default_na=False) for f in (evals[0], evals[-1]))
    gold = [[gold_score(q, r) for q, r in zip(t["query"], t.postprocessed_response)] for t in (first, last)]
    diff = torch.tensor(gold[1]) - torch.tensor(gold[0])
    assert len(diff) == 256 and diff.mean() > 3 * diff.std() / math.sqrt(len(diff)), (diff.mean(), diff.std())
    ended = first.has_eos.astype(bool)  # the others get the fixed penalty
    assert ended.mean() > 0.5 and (first.score[ended] - pd.Series(gold[0])[ended]).abs().max() < 1e-6


def test_rebel_chat_lora_adjacent_pairs_text_prompts_and_a_reward_function(chat, tmp_path):
    """The other path through the same run: text prompts rendered with --chat, a reward function instead of the reward
    model, four samples in two adjacent pairs per prompt, LoRA, no reference responses."""
    (tmp_path / "r.py").write_text("def short(prompts, responses):\n    return [-len(r.split()) for r in responses]\n")
    flags = [*chat_flags(chat), "--query_column", "prompt", "--chat", "--reference_column", "None", "--reward_fn",
             f"{tmp_path}/r.py:short", "--num_samples", "4", "--lora_rank", "4", "--lora_alpha", "8"]  # fmt: skip
    run_script("rebel.py", *flags, "--output_dir", str(tmp_path / "out"), "--run_dir", str(tmp_path / "run"))
    after = pd.read_csv(tmp_path / "run" / "eval_000002.csv", keep_default_na=False)
    assert "reference_score" not in after and len(after) == 8
    lengths = after.postprocessed_response.str.split().str.len()
    assert (after.score[after.has_eos == False] == -1.0).all()  # noqa: E712  (the penalty)
    assert (after.score[after.has_eos] == -lengths[after.has_eos]).all()  # the function's value
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "hello"}]))
    args = alpaca_eval_hook.Args(model_path=str(tmp_path / "out"), instructions=str(tmp_path / "alpaca.json"),
                                 output_dir=str(tmp_path), max_new_tokens=8)  # fmt: skip
    [answer] = json.loads(open(alpaca_eval_hook.main(args)).read())  # the hook loads the adapter on its base
    assert answer["instruction"] == "hello" and answer["generator"] == "out"


@pytest.mark.slow
def test_dpo_on_conversation_pairs(chat, tmp_path):
    """dpo.py on UltraFeedback-shaped pairs: the prompt and the chosen answer in one conversation, the rejected answer
    in another; both rendered with the chat template, evaluated with the other family's reward model."""
    rows = [json.loads(line) for line in open(os.path.join(chat.data, "train.jsonl"))]
    pairs = [{"messages": r["messages"], "rejected": [*r["messages"][:1], {"role": "assistant", "content": "i feel ."}]}
             for r in rows]  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    flags = [*chat_flags(chat), "--preference_dataset", str(tmp_path / "pairs.jsonl"), "--chosen_column", "messages",
             "--rejected_column", "rejected", "--lora_rank", "4", "--lora_alpha", "8"]  # fmt: skip
    run_script("dpo.py", *flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"))
    rows = [r for r in read_metrics(tmp_path / "run") if "update" in r]
    assert [r["update"] for r in rows] == [1, 2] and rows[-1]["policy/logprob_chosen"] < 0


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [
    ("rloo.py", ["--rloo_k", "2", "--no-lora", "--num_trainable_layers", "1"]),
    ("iterative_dpo.py", ["--lora_rank", "4", "--lora_alpha", "8"]),
])  # fmt: skip
def test_baselines_on_the_chat_task(chat, tmp_path, script, flags):
    """The baselines share the chat path: rendered prompts, the reward model's own tokenizer, stop tokens."""
    run_script(script, *chat_flags(chat), *flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"))
    after = pd.read_csv(tmp_path / "run" / "eval_000002.csv", keep_default_na=False)
    assert len(after) == 8 and after.kl.abs().max() > 0 and "reference_score" in after


def test_ppo_refuses_a_critic_of_another_vocabulary(chat, tmp_path):
    message = bad_input_message("ppo.py", [*chat_flags(chat), "--run_dir", str(tmp_path / "run")])
    assert "ppo.py starts its critic from the reward model" in message
