import json
import os

import pytest
from eval_helpers import (
    CHAT_TEMPLATE,
    END_OF_TURN,
    build_chat_recipe_model,
    build_cycling_llama,
    build_tiny_chat_model,
)

import eval.mt_bench_hook as mt_bench_hook
from eval.alpaca_eval_hook import Args as AlpacaArgs
from eval.alpaca_eval_hook import main as alpaca_main
from eval.generation import generate_chat, load_model_and_tokenizer, stop_token_ids

QUESTIONS = [
    {"question_id": 82, "category": "math", "turns": ["what is the capital of france ?", "tell me a story"]},
    {"question_id": 81, "category": "writing", "turns": ["write a poem", "hello"]},
    {"question_id": 90, "category": "unlisted", "turns": ["hello", "thanks"]},
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat")))


def test_alpaca_eval_outputs_format(tiny_model, tmp_path, capsys):
    records = [
        {"instruction": "write a poem", "output": "reference", "generator": "gpt4", "dataset": "helpful_base"},
        {"instruction": "what is the capital of france ?", "output": "paris", "generator": "gpt4", "dataset": "koala"},
    ]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    args = AlpacaArgs(
        model_path=tiny_model,
        instructions=str(tmp_path / "alpaca.json"),
        output_dir=str(tmp_path / "out"),
        max_new_tokens=5,
        generator="tiny",
    )
    path = alpaca_main(args)
    outputs = json.load(open(path))
    assert [o["instruction"] for o in outputs] == [r["instruction"] for r in records]
    assert [o["dataset"] for o in outputs] == ["helpful_base", "koala"]
    for o in outputs:
        assert set(o) == {"instruction", "output", "generator", "dataset"} and o["generator"] == "tiny"
        assert isinstance(o["output"], str) and o["output"] != "reference"
    assert f"alpaca_eval --model_outputs {path}" in capsys.readouterr().out

    # A .jsonl instruction file without a dataset column gives records without one.
    (tmp_path / "alpaca.jsonl").write_text(
        "".join(json.dumps({"instruction": r["instruction"]}) + "\n" for r in records)
    )
    args.instructions, args.max_instructions = str(tmp_path / "alpaca.jsonl"), 1
    [only] = json.load(open(alpaca_main(args)))
    assert set(only) == {"instruction", "output", "generator"}


def test_a_hook_that_fails_part_way_keeps_the_answers_it_generated(tiny_model, tmp_path, monkeypatch):
    """Generation that fails at its third batch (out of memory, say) leaves the first two answers on disk; a run that
    finishes leaves only the answers file."""
    import transformers

    records = [{"instruction": f"question {i}"} for i in range(3)]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    args = AlpacaArgs(
        model_path=tiny_model, instructions=str(tmp_path / "alpaca.json"), output_dir=str(tmp_path / "out"),
        max_new_tokens=3, batch_size=1,
    )  # fmt: skip
    path = alpaca_main(args)
    assert os.listdir(tmp_path / "out") == ["model_outputs.json"]
    generate, calls = transformers.GenerationMixin.generate, []

    def fails_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return generate(self, *a, **k)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", fails_third)
    os.remove(path)
    with pytest.raises(RuntimeError, match="out of memory"):
        alpaca_main(args)
    kept = [json.loads(line) for line in open(path + ".partial.jsonl")]
    assert [k["conversation"][0]["content"] for k in kept] == ["question 0", "question 1"]
    assert all(isinstance(k["answer"], str) for k in kept) and not os.path.exists(path)


def test_mt_bench_answers_format(tiny_model, tmp_path, monkeypatch, capsys):
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    temperatures, real_generate = [], mt_bench_hook.generate_chat

    def spy(model, tokenizer, conversations, temperature, *rest):
        temperatures.append((temperature, len(conversations[0])))
        return real_generate(model, tokenizer, conversations, temperature, *rest)

    monkeypatch.setattr(mt_bench_hook, "generate_chat", spy)
    args = mt_bench_hook.Args(
        model_path=tiny_model,
        questions=str(tmp_path / "question.jsonl"),
        output_dir=str(tmp_path),
        max_new_tokens=4,
        model_id="tiny-rebel",
    )
    path = mt_bench_hook.main(args)
    assert path.endswith("tiny-rebel.jsonl")
    answers = [json.loads(line) for line in open(path)]
    assert [a["question_id"] for a in answers] == [81, 82, 90]
    for a in answers:
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "tiny-rebel" and isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float)
        [choice] = a["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2 and all(isinstance(t, str) for t in choice["turns"])
    # FastChat's category temperatures (math greedy, writing 0.7, unknown 0.7); turn 2 carries turn 1 (3 messages).
    assert sorted(temperatures) == [(0.0, 1), (0.0, 3), (0.7, 1), (0.7, 3)]
    out = capsys.readouterr().out
    assert (
        "python gen_judgment.py --model-list tiny-rebel" in out
        and "python show_result.py --model-list tiny-rebel" in out
    )


def test_missing_chat_template_names_the_fix(tmp_path):
    plain = build_tiny_chat_model(str(tmp_path / "plain"), with_chat_template=False)
    with pytest.raises(ValueError, match="--chat_template PATH"):
        load_model_and_tokenizer(plain)
    (tmp_path / "template.jinja").write_text(CHAT_TEMPLATE)
    _, tokenizer = load_model_and_tokenizer(plain, chat_template=str(tmp_path / "template.jinja"))
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_peft_adapter_directory(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapter = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["query_key_value"]))
    adapter.save_pretrained(tmp_path / "adapter")  # no tokenizer here: the base model's is used
    model, tokenizer = load_model_and_tokenizer(str(tmp_path / "adapter"))
    assert type(model).__name__.startswith("Peft") and tokenizer.chat_template == CHAT_TEMPLATE


QUESTION = [[{"role": "user", "content": "what is the capital of france ?"}]]


def test_generation_stops_on_the_models_own_end_of_turn(tmp_path):
    model, tokenizer = load_model_and_tokenizer(build_cycling_llama(str(tmp_path)))
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert stop_token_ids(model, tokenizer) == [tokenizer.eos_token_id, end_of_turn]
    # Stopping on the tokenizer's EOS only, the answer runs on into an invented next turn ("hello user : hello ...").
    assert generate_chat(model, tokenizer, QUESTION, temperature=0.0, max_new_tokens=8) == ["hello"]
    # An int in generation_config is kept too, and the tokenizer's EOS is added once.
    model.generation_config.eos_token_id = end_of_turn
    assert stop_token_ids(model, tokenizer) == [end_of_turn, tokenizer.eos_token_id]


def test_generation_settings_passed_win_over_the_models_others_kept(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    # The model's generation_config.json samples hot, stops after 1 new token and suppresses "user".
    path = build_cycling_llama(str(tmp_path), stops_on_end_of_turn=False, do_sample=True, temperature=50.0)
    saved = GenerationConfig.from_pretrained(path)
    saved.update(max_new_tokens=1, suppress_tokens=[AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("user")])
    saved.save_pretrained(path)
    model, tokenizer = load_model_and_tokenizer(path)
    answers = {generate_chat(model, tokenizer, QUESTION, temperature=0.0, max_new_tokens=6)[0] for _ in range(5)}
    # Greedy and up to 6 tokens (as passed), "user" suppressed (the model's own setting): hello <|eot_id|> thanks,
    # then the all-zero logits after "thanks" pick token 0, the EOS.
    assert answers == {"hello thanks"}


def test_hooks_on_a_chat_recipe_model_never_feed_the_pad_id(tmp_path):
    path = build_chat_recipe_model(str(tmp_path / "model"))
    model, tokenizer = load_model_and_tokenizer(path)
    assert tokenizer.pad_token_id == model.get_input_embeddings().num_embeddings  # no embedding row for it
    # Prompts of different lengths, so that the batch is left-padded; greedy, 3 tokens on a random model.
    (tmp_path / "alpaca.json").write_text(
        json.dumps([{"instruction": "write a poem"}, {"instruction": QUESTION[0][0]["content"]}])
    )
    args = AlpacaArgs(
        model_path=path, instructions=str(tmp_path / "alpaca.json"), output_dir=str(tmp_path / "out"),
        temperature=0.0, max_new_tokens=3, batch_size=2,
    )  # fmt: skip
    batched = [o["output"] for o in json.load(open(alpaca_main(args)))]
    # Masked pads and positions counted from the first real token: each prompt is answered as it is alone.
    args.batch_size, args.output_dir = 1, str(tmp_path / "out_single")
    assert batched == [o["output"] for o in json.load(open(alpaca_main(args)))]
    (tmp_path / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS[1:]))
    mt_args = mt_bench_hook.Args(
        model_path=path, questions=str(tmp_path / "question.jsonl"), output_dir=str(tmp_path), max_new_tokens=3,
        model_id="recipe", batch_size=2,
    )  # fmt: skip
    assert len(open(mt_bench_hook.main(mt_args)).readlines()) == 2


def test_requirements_bound_every_package_to_its_tested_versions():
    """A fresh install must not pick up a future major release (transformers 6, datasets 6, peft 1.0), and the
    versions the code is run with must stay admitted: this environment's, and the GPU image's transformers and peft."""
    import os
    from importlib.metadata import version

    from packaging.requirements import Requirement

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = ("requirements.txt", "requirements-model.txt")  # the second: the real model of the slow tests
    lines = [line.split("#")[0].strip() for name in files for line in open(os.path.join(root, name))]
    requirements = {r.name: r for r in map(Requirement, filter(None, lines))}
    assert str(requirements["torch"].specifier) == "==2.13.0"
    for name, requirement in requirements.items():
        assert any(s.operator in ("<", "==") for s in requirement.specifier), f"{name} has no upper bound"
        assert requirement.specifier.contains(version(name).split("+")[0]), f"installed {name} not admitted"
    for name, gpu_image in (("transformers", "5.17.0"), ("peft", "0.21.0")):
        assert requirements[name].specifier.contains(gpu_image)
    for name, breaking in (("transformers", "6.0"), ("datasets", "6.0"), ("peft", "1.0")):
        assert not requirements[name].specifier.contains(breaking)
