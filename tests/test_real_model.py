"""A real pretrained chat model, SmolLM2-135M-Instruct (tests/real_model.py): its BPE tokenizer, ChatML template and
end of turn (<|im_end|>), where the other tests have toy models with tokenizers trained on the spot."""

import json
import os
import threading
import time
from types import SimpleNamespace

import pytest
import real_model
from conftest import read_metrics, run_script


def test_two_conversions_at_once_leave_one_whole_folder(tmp_path, monkeypatch):
    """Two test processes starting on an empty cache both convert; each writes its own folder and renames it into
    place, so the cache ends with one complete model, no half-written one and no leftovers, and neither fails."""

    def slow_convert(gguf, out):
        open(os.path.join(out, "config.json"), "w").write("{}")
        time.sleep(0.3)  # both are converting now
        open(os.path.join(out, "model.safetensors"), "w").write(gguf)

    monkeypatch.setattr(real_model, "convert", slow_convert)
    out, errors = str(tmp_path / "cache" / "model"), []

    def convert():
        try:
            real_model.convert_once("weights", out)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path / "cache") == ["model"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_the_converted_model_answers_through_its_chat_template(smollm2):
    """The folder loads as any checkpoint; the tokenizer carries SmolLM2's ChatML template, and a greedy answer through
    it is SmolLM2's and ends at the template's end of turn, <|im_end|> (its EOS, also in the generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2)
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    query = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(query["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    answer = model.generate(**query, max_new_tokens=24, do_sample=False)[0, query["input_ids"].size(1) :]
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|im_end|>"


# ---------------------------------------------------------------------------------------------- every script on it

# Questions SmolLM2 answers in one short sentence when greedy: the evaluation prompts, with those answers.
EVAL = [("What is the capital of France?", "The capital of France is Paris."),
        ("What is the capital of Japan?", "The capital of Japan is Tokyo.")]  # fmt: skip
TRAIN = ["What is the capital of Germany?", "Name a fruit.", "What is 2 + 2?", "How many legs does a dog have?"]
SHORT_ANSWER = "It is."
LONG_ANSWER = "I am not sure, but there are many things one could say about this question, so let me think."
FUNCTIONS = """import math


def brevity(prompts, responses):  # --reward_fn: shorter answers score higher
    return [-len(r.split()) / 10 for r in responses]


def shorter(prompts, responses_a, responses_b):  # --preference_fn: P(a > b), the shorter one preferred
    return [1 / (1 + math.exp((len(a.split()) - len(b.split())) / 4)) for a, b in zip(responses_a, responses_b)]
"""
# One or two updates of 2 prompts, with SmolLM2's ChatML template (--chat renders the text prompts with it), stopping at
# its end of turn; prompts are 30-40 tokens with the template's default system prompt.
SMALL = ["--stop_at_eos", "--query_length", "48", "--pad_multiple", "8", "--response_length", "16", "--batch_size", "2",
         "--per_device_train_batch_size", "2", "--local_rollout_forward_batch_size", "2", "--num_eval_prompts", "2",
         "--eval_freq", "0", "--save_freq", "0", "--lora_rank", "8", "--lora_alpha", "16", "--lr", "1e-5"]  # fmt: skip


def conversation(question: str, answer: str | None = None) -> list[dict]:
    return [{"role": "user", "content": question}, *([{"role": "assistant", "content": answer}] if answer else [])]


@pytest.fixture(scope="module")
def real(smollm2, tmp_path_factory):
    """Data written here (a JSONL of conversations per split, with the question as text too, and preference pairs),
    the reward and preference functions, and a reward model trained from SmolLM2 by reward.py."""
    d = tmp_path_factory.mktemp("real")
    (d / "data").mkdir()  # apart from what the runs write: a run writes nothing inside what it reads
    # "stable": the question whose greedy answer survives bf16 rounding, for the bf16 run. Along SmolLM2's answer the
    # smallest gap between the top two logits (fp32) is 0.97 for Japan but 0.08 for France's first token ("The" over
    # "L"), where, at logits near 25, one bf16 step is 0.125: after one update in bf16 France's answer can flip.
    for split, questions in (("train", TRAIN), ("validation", [q for q, _ in EVAL]), ("stable", [EVAL[1][0]])):
        answers = dict(EVAL)
        with open(d / "data" / f"{split}.jsonl", "w") as f:
            for q in questions:
                row = {"question": q, "messages": conversation(q, answers.get(q, SHORT_ANSWER)),
                       "chosen": conversation(q, SHORT_ANSWER), "rejected": conversation(q, LONG_ANSWER)}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    (d / "functions.py").write_text(FUNCTIONS)
    rm = ["--preference_dataset", str(d / "data"), "--query_dataset", str(d / "data"), "--query_column", "messages",
          "--reference_column", "messages", "--sft_model_path", smollm2, "--query_length", "48",
          "--pad_multiple", "8", "--response_length", "24", "--batch_size", "4", "--per_device_train_batch_size", "4",
          "--lr", "1e-4", "--save_freq", "0"]  # fmt: skip
    run_script("reward.py", *rm, "--output_dir", str(d / "rm"), "--run_dir", str(d / "runs/rm"), timeout=600)
    return SimpleNamespace(
        dir=d, data=str(d / "data"), model=smollm2, rm=str(d / "rm"), functions=str(d / "functions.py")
    )


def check_replies_end_at_end_of_turn(run_dir, model: str) -> None:
    """The last evaluation table holds SmolLM2's own short answers (near-greedy), each ended by <|im_end|>: has_eos,
    the token counted in response_length, not shown in the text, and nothing of a next turn after it."""
    import pandas as pd
    from transformers import AutoTokenizer

    last = sorted(f for f in os.listdir(run_dir) if f.startswith("eval_"))[-1]
    table = pd.read_csv(os.path.join(run_dir, last))
    assert len(table) and set(zip(table["query"], table.postprocessed_response)) <= set(EVAL), table.to_string()
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert table.has_eos.all()
    assert table.response_length.tolist() == [len(tokenizer(a).input_ids) + 1 for a in table.postprocessed_response]


def check_answers_through_its_template(path: str) -> None:
    """The saved policy (a LoRA adapter or a whole model) loads as the hooks load it and answers a question, rendered
    with the chat template saved beside it, with SmolLM2's answer and its end of turn."""
    from eval.generation import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, device="cpu")
    question, answer = EVAL[0]
    query = tokenizer.apply_chat_template(
        conversation(question), add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    reply = model.generate(**query, max_new_tokens=16, do_sample=False)[0, query["input_ids"].size(1) :]
    assert tokenizer.decode(reply) == answer + "<|im_end|>"


def rl_flags(real, *flags) -> list[str]:
    return ["--sft_model_path", real.model, "--query_dataset", real.data, "--query_column", "question", "--chat",
            "--reference_column", "messages", *SMALL, *flags]  # fmt: skip


def run_rl(script, real, tmp_path, *flags, updates=1, episodes=2, torchrun=0) -> str:
    """A run of `updates` updates of `episodes` prompts each on the real model: its replies and its saved policy
    checked; returns the policy."""
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    run_script(script, *rl_flags(real, "--total_episodes", str(episodes * updates), *flags), "--output_dir", out, "--run_dir", run, torchrun=torchrun,
               timeout=900)  # fmt: skip
    rows = [r for r in read_metrics(run) if "update" in r]
    assert [r["update"] for r in rows] == list(range(1, updates + 1)) and rows[-1]["loss/policy"] == rows[-1][
        "loss/policy"
    ]
    check_replies_end_at_end_of_turn(run, real.model)
    check_answers_through_its_template(out)
    return out


@pytest.fixture(scope="module")
def rebel_policy(real, tmp_path_factory):
    """rebel.py as the paper's chat setting runs it: text prompts through the chat template, the reward model from
    reward.py, two updates."""
    return run_rl("rebel.py", real, tmp_path_factory.mktemp("rebel"), "--reward_model_path", real.rm, updates=2)


@pytest.mark.slow
def test_sft(real, tmp_path):
    """sft.py trains on conversations rendered with the template (answers ending at <|im_end|>) and saves a model that
    answers through it."""
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    run_script("sft.py", "--query_dataset", real.data, "--query_column", "messages", "--reference_column", "messages",
               "--base_model", real.model, "--query_length", "48", "--pad_multiple", "8", "--response_length", "24",
               "--batch_size", "4", "--per_device_train_batch_size", "4", "--lr", "1e-5", "--save_freq", "0",
               "--output_dir", out, "--run_dir", run, timeout=600)  # fmt: skip
    assert [r["update"] for r in read_metrics(run) if "loss/sft" in r] == [1]
    check_answers_through_its_template(out)


@pytest.mark.slow
def test_reward_model(real):
    """reward.py's model (the fixture's) loads as a sequence classifier with SmolLM2's tokenizer and template."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(real.rm)
    tokenizer = AutoTokenizer.from_pretrained(real.rm)
    assert model.config.num_labels == 1 and "<|im_start|>" in tokenizer.chat_template
    assert [r["update"] for r in read_metrics(real.dir / "runs/rm") if "loss/reward" in r] == [1]


@pytest.mark.slow
def test_rebel(rebel_policy):
    assert os.path.isfile(os.path.join(rebel_policy, "adapter_config.json"))


@pytest.mark.slow
def test_rebel_mu_dataset_in_bf16(real, tmp_path):
    """--mu dataset (y' is the conversation's answer, rendered by the template up to its <|im_end|>), a reward
    function, and bf16 compute; one prompt, one sample and one evaluation prompt (the "stable" split's), as this CPU
    has no bf16 matmul instructions (bf16 runs about 6x slower than fp32 on it)."""
    run_rl("rebel.py", real, tmp_path, "--mu", "dataset", "--mu_column", "messages", "--query_column", "messages",
           "--reward_fn", f"{real.functions}:brevity", "--precision", "bf16", "--batch_size", "1",
           "--per_device_train_batch_size", "1", "--local_rollout_forward_batch_size", "1", "--num_eval_prompts", "1",
           "--eval_split", "stable", episodes=1)  # fmt: skip


@pytest.mark.slow
def test_rebel_preference_fn_on_two_ranks(real, tmp_path):
    """--preference_fn under torchrun --nproc_per_node 2: one prompt per rank."""
    run_rl("rebel.py", real, tmp_path, "--preference_fn", f"{real.functions}:shorter", "--reward_model_path", real.rm,
           "--per_device_train_batch_size", "1", "--local_rollout_forward_batch_size", "1", torchrun=2)  # fmt: skip


@pytest.mark.slow
def test_ppo(real, tmp_path):
    run_rl("ppo.py", real, tmp_path, "--reward_model_path", real.rm, "--noptepochs", "1")


@pytest.mark.slow
def test_rloo(real, tmp_path):
    run_rl("rloo.py", real, tmp_path, "--reward_fn", f"{real.functions}:brevity")


@pytest.mark.slow
def test_dpo(real, tmp_path):
    """dpo.py on preference pairs of conversations, evaluated with the reward model."""
    run_rl("dpo.py", real, tmp_path, "--preference_dataset", real.data, "--query_column", "messages",
           "--reward_model_path", real.rm)  # fmt: skip


@pytest.mark.slow
def test_iterative_dpo(real, tmp_path):
    run_rl("iterative_dpo.py", real, tmp_path, "--reward_model_path", real.rm, "--noptepochs", "1")


@pytest.mark.slow
def test_alpaca_eval_and_mt_bench_hooks(rebel_policy, tmp_path):
    """The hooks on REBEL's saved policy (a LoRA adapter on SmolLM2): the answers are SmolLM2's, cut at its end of
    turn, and MT-Bench's second turn follows the first through the template."""
    from eval import alpaca_eval_hook, mt_bench_hook

    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": q, "dataset": "real"} for q, _ in EVAL]))
    path = alpaca_eval_hook.main(
        alpaca_eval_hook.Args(
            model_path=rebel_policy, instructions=str(tmp_path / "alpaca.json"), output_dir=str(tmp_path / "alpaca"),
            temperature=0.0, max_new_tokens=16,
        )
    )  # fmt: skip
    assert [o["output"] for o in json.loads(open(path).read())] == [a for _, a in EVAL]
    question = {"question_id": 1, "category": "math", "turns": [EVAL[0][0], EVAL[1][0]]}  # math: greedy
    (tmp_path / "question.jsonl").write_text(json.dumps(question) + "\n")
    mt_bench_hook.main(
        mt_bench_hook.Args(
            model_path=rebel_policy, model_id="rebel", questions=str(tmp_path / "question.jsonl"),
            output_dir=str(tmp_path / "mt"), max_new_tokens=16,
        )
    )  # fmt: skip
    (answer,) = [json.loads(line) for line in open(tmp_path / "mt/rebel.jsonl")]
    assert answer["choices"][0]["turns"] == [a for _, a in EVAL]


# ---------------------------------------------------------------------------------------------- a learning check

COUNTRIES = ["France", "Japan", "Germany", "Italy", "Spain", "Canada", "Brazil", "Egypt", "India", "Kenya", "Mexico",
             "Norway", "Peru", "Chile", "China", "Greece", "Sweden", "Poland", "Turkey", "Iran", "Vietnam", "Ghana",
             "Cuba", "Chad", "Nepal", "Ireland", "Portugal", "Austria", "Finland", "Morocco", "Argentina", "Colombia"]  # fmt: skip
THINGS = ["the sun", "a cat", "the ocean", "a tree", "rain", "a computer", "music", "the moon", "a bicycle", "bread",
          "snow", "a river", "coffee", "a library", "the wind", "a volcano", "a bridge", "salt", "a clock", "honey",
          "a forest", "the desert", "a train", "paper", "a garden", "the rainbow", "a lighthouse", "cheese", "a map",
          "the stars", "a violin", "a glacier"]  # fmt: skip
BREVITY = "def brevity(prompts, responses):\n    return [-len(r.split()) / 10 for r in responses]\n"
# docs/real_model.md: the command, the curve and the time of this run.
LEARNING = ["--query_column", "question", "--chat", "--reference_column", "None", "--penalty_reward_value", "-4",
            "--stop_at_eos", "--query_length", "48", "--pad_multiple", "8", "--response_length", "32", "--batch_size",
            "8", "--per_device_train_batch_size", "8", "--local_rollout_forward_batch_size", "16", "--total_episodes",
            "32", "--num_eval_prompts", "96", "--eval_freq", "4", "--lora_rank", "16", "--lora_alpha", "32", "--lr",
            "2e-4", "--noptepochs", "4", "--save_freq", "0", "--output_dir", ""]  # fmt: skip


def learning_questions() -> dict[str, list[str]]:
    """64 training and 96 evaluation questions in five styles, which SmolLM2 answers at very different lengths."""
    questions = [f"What is the capital of {c}?" for c in COUNTRIES] + [f"Tell me about {t}." for t in THINGS]
    questions += [f"What is {a} + {b}?" for a, b in zip(range(2, 34), range(7, 71, 2))]
    questions += [f"Why is {t} important?" for t in THINGS] + [f"Where is {c}?" for c in COUNTRIES]
    order = sorted(range(len(questions)), key=lambda i: (i * 37) % len(questions))  # the styles mixed in both splits
    questions = [questions[i] for i in order]
    return {"train": questions[:64], "validation": questions[64:]}


@pytest.mark.slow
def test_rebel_learns_short_answers(smollm2, tmp_path):
    """REBEL with a reward for short answers (minus a tenth of the word count; -4 for an answer cut off before its
    <|im_end|>) raises SmolLM2's evaluation reward (near-greedy) on 96 held-out questions by more than 3 standard errors
    of the per-question difference, in 4 updates of 8 questions (docs/real_model.md: the numbers and the time)."""
    import pandas as pd

    (tmp_path / "data").mkdir()
    for split, questions in learning_questions().items():
        (tmp_path / "data" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"question": q}) + "\n" for q in questions)
        )
    (tmp_path / "brevity.py").write_text(BREVITY)
    run = tmp_path / "run"
    run_script("rebel.py", "--query_dataset", str(tmp_path / "data"), "--sft_model_path", smollm2, "--reward_fn",
               f"{tmp_path / 'brevity.py'}:brevity", *LEARNING, "--run_dir", str(run), timeout=3600)  # fmt: skip
    before, after = (pd.read_csv(run / f"eval_{u:06d}.csv").set_index("query").score for u in (0, 4))
    gain = after - before.loc[after.index]
    print(
        f"eval reward {before.mean():.3f} -> {after.mean():.3f}, gain {gain.mean():.3f} +- {gain.std() / len(gain) ** 0.5:.3f}"
    )
    assert len(gain) == 96
    assert gain.mean() > 3 * gain.std() / len(gain) ** 0.5, (before.mean(), after.mean(), gain.std())
