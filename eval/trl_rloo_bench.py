"""rloo.py against TRL's RLOOTrainer at equal settings (docs/benchmark.md): the prompts, the reward function, and the
TRL side of the comparison. Only `train` imports trl (install it in a virtual environment of its own, with peft);
the reward function is importable by rloo.py's --reward_fn without it.

    python eval/trl_rloo_bench.py data DIR        # DIR/prompts.jsonl: 64 one-turn chat prompts in a "prompt" column
    python rloo.py --reward_fn eval/trl_rloo_bench.py:reward --query_dataset DIR/prompts.jsonl --query_column prompt ...
    python eval/trl_rloo_bench.py train --model M --data DIR/prompts.jsonl --updates N ...   # TRL's RLOO

`train` prints each update's wall and CPU seconds (a trainer callback around one update: generation, log-probs and the
optimizer step) and their medians; rloo.py writes time/total per update into metrics.jsonl.
"""

import argparse
import json
import os
import statistics
import time

TOPICS = ["photosynthesis", "the water cycle", "how a bicycle works", "the French revolution", "black holes",
          "how vaccines work", "the stock market", "plate tectonics", "machine learning", "the Roman empire",
          "how bread rises", "ocean tides", "the human heart", "electric cars", "volcanoes",
          "the internet"]  # fmt: skip
ASKS = ["Explain {} in detail.", "Write a long essay about {}.", "Describe {} to a curious child, step by step.",
        "List everything you know about {}."]  # fmt: skip


def reward(prompts: list, responses: list[str]) -> list[float]:
    """The share of distinct words in the response (0 for an empty one): cheap, and the same for both trainers."""
    words = [response.lower().split() for response in responses]
    return [len(set(w)) / len(w) if w else 0.0 for w in words]


def write_prompts(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "prompts.jsonl")
    with open(path, "w") as f:
        for ask in ASKS:
            for topic in TOPICS:
                f.write(json.dumps({"prompt": [{"role": "user", "content": ask.format(topic)}]}) + "\n")
    return path


def train(args) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    torch.set_num_threads(1)
    seconds = []

    class UpdateTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append((time.perf_counter() - self.start[0], time.process_time() - self.start[1]))

    def trl_reward(prompts, completions, **kwargs):
        return reward(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions])

    completions = args.prompts_per_update * args.samples
    config = RLOOConfig(
        output_dir=args.output_dir, max_steps=args.updates, learning_rate=args.lr, seed=args.seed,
        per_device_train_batch_size=completions, gradient_accumulation_steps=1, num_generations=args.samples,
        max_completion_length=args.response_length, num_iterations=args.epochs, beta=args.kl_coef,
        temperature=args.temperature, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    # peft's default modules for the architecture, as rloo.py's default --lora_target_modules (Llama: q_proj, v_proj)
    peft_config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    trainer = RLOOTrainer(model=model, reward_funcs=trl_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[UpdateTimes()])  # fmt: skip
    trainer.train()
    print("seconds per update (wall/cpu):", " ".join(f"{wall:.2f}/{cpu:.2f}" for wall, cpu in seconds))
    print(f"median s/update: {statistics.median(w for w, _ in seconds):.2f} wall, "
          f"{statistics.median(c for _, c in seconds):.2f} cpu")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("data").add_argument("folder")
    run = commands.add_parser("train")
    run.add_argument("--model", required=True, help="a save_pretrained causal LM folder (the SFT policy)")
    run.add_argument("--data", required=True, help="the prompts.jsonl that `data` writes")
    run.add_argument("--output_dir", default="/tmp/trl_rloo_bench")
    run.add_argument("--updates", type=int, default=4)
    run.add_argument("--prompts_per_update", type=int, default=4)
    run.add_argument("--samples", type=int, default=2, help="responses per prompt (rloo.py's --rloo_k)")
    run.add_argument("--response_length", type=int, default=32)
    run.add_argument("--epochs", type=int, default=1, help="passes over each update's samples (--noptepochs)")
    run.add_argument("--lora_rank", type=int, default=8)
    run.add_argument("--lr", type=float, default=1e-5)
    run.add_argument("--kl_coef", type=float, default=0.05)
    run.add_argument("--temperature", type=float, default=0.7)
    run.add_argument("--seed", type=int, default=1)
    run.add_argument("--gradient_checkpointing", action="store_true", help="TRL's default; rloo.py's is off")
    args = parser.parse_args()
    if args.command == "data":
        print(write_prompts(args.folder))
    else:
        train(args)


if __name__ == "__main__":
    main()
