"""Generate MT-Bench answers with a trained model, in the answer JSONL that FastChat's llm_judge reads.

The paper reports MT-Bench first-turn, second-turn and average scores judged by GPT-4 (Section 4.2, Table 2,
Appendix O). This script only generates the two-turn answers; judging stays in FastChat, whose commands it prints:

    python -m eval.mt_bench_hook --model_path runs/rebel_chat/model --model_id rebel-chat --output_dir mt_bench_out

Output format: one line per question, as written by FastChat's fastchat/llm_judge/gen_model_answer.py
(https://github.com/lm-sys/FastChat/blob/main/fastchat/llm_judge/gen_model_answer.py):
{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [turn1, turn2]}], "tstamp"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import tyro

from eval import BadInput, print_error
from eval.generation import MAX_NEW_TOKENS, generate_chat, load_for_hook, output_file, read_records

QUESTIONS_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/question.jsonl"

# Per-category sampling temperatures, as in FastChat's `temperature_config`
# (https://github.com/lm-sys/FastChat/blob/main/fastchat/llm_judge/common.py); other categories get 0.7 there too.
TEMPERATURE_CONFIG = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
DEFAULT_TEMPERATURE = 0.7


@dataclass
class Args:
    model_path: str
    """a save_pretrained directory, a hub name, or a peft adapter directory"""
    model_id: str = ""
    """the name FastChat's judge and result tables use; default the model directory's name"""
    questions: str = QUESTIONS_URL
    """MT-Bench questions: a local question.jsonl, or (default) FastChat's file fetched from GitHub"""
    output_dir: str = "mt_bench_out"
    """{model_id}.jsonl is written here"""
    chat_template: str = ""
    """a Jinja chat-template file, for a tokenizer that has none"""
    max_new_tokens: int = MAX_NEW_TOKENS
    """generation length cap per turn (FastChat's default and the paper's general-chat generation length)"""
    batch_size: int = 8
    """questions generated together (one batch per category temperature)"""
    max_questions: int = 0
    """answer the first N questions only (0 = all 80); for smoke tests"""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """model dtype: auto, bfloat16, float16, float32"""
    seed: int = 0
    """sampling seed"""


def answer_questions(model, tokenizer, questions: list[dict], args: Args, partial: str = "") -> list[list[str]]:
    """Both turns of every question; turn 2 sees the question, the model's own turn-1 answer and the follow-up. Each
    batch's answers are appended to `partial` as they come, so that a failure part-way loses none."""
    turns = [[] for _ in questions]
    by_temperature: dict[float, list[int]] = {}
    for i, q in enumerate(questions):
        by_temperature.setdefault(TEMPERATURE_CONFIG.get(q["category"], DEFAULT_TEMPERATURE), []).append(i)
    for temperature, ids in by_temperature.items():
        for turn in range(2):
            conversations = []
            for i in ids:
                messages = []
                for user, assistant in zip(questions[i]["turns"][:turn], turns[i], strict=True):
                    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
                conversations.append(messages + [{"role": "user", "content": questions[i]["turns"][turn]}])
            answers = generate_chat(
                model, tokenizer, conversations, temperature, 1.0, args.max_new_tokens, args.batch_size, partial
            )
            for i, answer in zip(ids, answers, strict=True):
                turns[i].append(answer)
    return turns


def main(args: Args) -> str:
    keys = {"question_id": int | str, "category": str, "turns": list}
    questions = read_records(args.questions, keys)[: args.max_questions or None]
    for q in questions:  # two user turns each: a question without its second would fail after every first answer
        if len(q["turns"]) < 2 or not all(isinstance(t, str) and t for t in q["turns"][:2]):
            raise BadInput(
                f"{args.questions}, question {q['question_id']}: 'turns' must hold two texts; fix or drop it"
            )
    model, tokenizer, model_id = load_for_hook(args, args.model_id)
    path = output_file(args.output_dir, f"{model_id}.jsonl")
    partial = path + ".partial.jsonl"
    open(partial, "w").close()
    turns = answer_questions(model, tokenizer, questions, args, partial)
    with open(path, "w") as f:
        for q, answer in sorted(zip(questions, turns, strict=True), key=lambda qa: qa[0]["question_id"]):
            record = {
                "question_id": q["question_id"],
                "answer_id": uuid.uuid4().hex[:22],
                "model_id": model_id,
                "choices": [{"index": 0, "turns": answer}],
                "tstamp": time.time(),
            }
            f.write(json.dumps(record) + "\n")
    os.remove(partial)
    print(f"wrote {len(questions)} two-turn answers to {path}; judge them with FastChat (needs OPENAI_API_KEY):")
    print("  cd FastChat/fastchat/llm_judge")
    print(f"  cp {os.path.abspath(path)} data/mt_bench/model_answer/{model_id}.jsonl")
    print(f"  python gen_judgment.py --model-list {model_id} --parallel 2")
    print(f"  python show_result.py --model-list {model_id}")
    return path


if __name__ == "__main__":
    sys.excepthook = print_error  # bad input or a failed read or write: one line, no traceback
    main(tyro.cli(Args, use_underscores=True))
