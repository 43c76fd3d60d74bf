"""Generate AlpacaEval 2.0 answers with a trained model, in the model-outputs JSON that `alpaca_eval` reads.

The paper reports AlpacaEval 2.0 (length-controlled) win rates against GPT-4-Turbo references (Section 4.2,
Table 2). This script only generates; scoring stays in AlpacaEval's own tool, whose command it prints:

    python -m eval.alpaca_eval_hook --model_path runs/rebel_chat/model --output_dir alpaca_out
    alpaca_eval --model_outputs alpaca_out/model_outputs.json     # needs OPENAI_API_KEY

Output format (the `--model_outputs` file of https://github.com/tatsu-lab/alpaca_eval): a JSON list
of {"instruction", "output", "generator"}, plus "dataset" when the instruction file has it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Literal

import tyro

from eval import BadInput, print_error
from eval.generation import MAX_NEW_TOKENS, generate_chat, load_for_hook, output_file, read_records

HUB_DATASET = "tatsu-lab/alpaca_eval"


@dataclass
class Args:
    model_path: str
    """a save_pretrained directory, a hub name, or a peft adapter directory"""
    instructions: str = HUB_DATASET
    """the AlpacaEval instructions: a local .json/.jsonl file, or the hub dataset tatsu-lab/alpaca_eval (alpaca_eval.json)"""
    output_dir: str = "alpaca_eval_out"
    """model_outputs.json is written here"""
    generator: str = ""
    """the name shown on the leaderboard; default the model directory's name"""
    chat_template: str = ""
    """a Jinja chat-template file, for a tokenizer that has none"""
    temperature: float = 0.7
    """sampling temperature; the paper does not state its AlpacaEval settings, 0.7 is AlpacaEval's usual one"""
    top_p: float = 1.0
    """nucleus sampling threshold"""
    max_new_tokens: int = MAX_NEW_TOKENS
    """generation length cap (the paper's general-chat generation length)"""
    batch_size: int = 8
    """prompts generated together"""
    max_instructions: int = 0
    """generate for the first N instructions only (0 = all 805); for smoke tests"""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """model dtype: auto, bfloat16, float16, float32"""
    seed: int = 0
    """sampling seed"""


def load_instructions(source: str) -> list[dict]:
    if os.path.exists(source) or source.startswith(("http://", "https://")):
        return read_records(source, {"instruction": str})
    if source != HUB_DATASET:
        raise BadInput(f"--instructions {source}: no such file; give a .json/.jsonl file, or {HUB_DATASET}")
    from huggingface_hub import hf_hub_download

    return read_records(hf_hub_download(HUB_DATASET, "alpaca_eval.json", repo_type="dataset"), {"instruction": str})


def main(args: Args) -> str:
    records = load_instructions(args.instructions)[: args.max_instructions or None]
    path = output_file(args.output_dir, "model_outputs.json")
    model, tokenizer, generator = load_for_hook(args, args.generator)
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in records]
    partial = path + ".partial.jsonl"  # each batch's answers as they come: a failure part-way loses none
    open(partial, "w").close()
    answers = generate_chat(
        model, tokenizer, conversations, args.temperature, args.top_p, args.max_new_tokens, args.batch_size, partial
    )
    outputs = []
    for record, answer in zip(records, answers, strict=True):
        out = {"instruction": record["instruction"], "output": answer, "generator": generator}
        if "dataset" in record:
            out["dataset"] = record["dataset"]
        outputs.append(out)
    with open(path, "w") as f:
        json.dump(outputs, f, indent=2)
    os.remove(partial)
    print(f"wrote {len(outputs)} answers to {path}; score them with AlpacaEval 2.0 (needs OPENAI_API_KEY):")
    print(f"  alpaca_eval --model_outputs {path}")
    return path


if __name__ == "__main__":
    sys.excepthook = print_error  # bad input or a failed read or write: one line, no traceback
    main(tyro.cli(Args, use_underscores=True))
