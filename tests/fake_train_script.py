"""A stand-in for rebel.py & co. that follows the metrics.jsonl contract eval/benchmark.py reads.

Update 1 is a slow warm-up with a memory spike; later updates have fixed phase times, so the benchmark's
means are known exactly. `--no_generation` mimics DPO (no generation phase).
"""

import argparse
import json
import os

parser = argparse.ArgumentParser()
for flag in ("run_dir", "sft_model_path", "reward_model_path", "query_dataset", "output_dir", "track"):
    parser.add_argument(f"--{flag}", default="")
for flag in (
    "total_episodes",
    "batch_size",
    "per_device_train_batch_size",
    "query_length",
    "response_length",
    "eval_freq",
):
    parser.add_argument(f"--{flag}", type=int, required=True)
parser.add_argument("--no_generation", action="store_true")
parser.add_argument("--fail", action="store_true")
args, unknown = parser.parse_known_args()
if args.fail:
    raise SystemExit("failing on purpose")
rank = int(os.environ.get("RANK", "0"))
world_size = int(os.environ.get("WORLD_SIZE", "1"))
if rank == 0:
    os.makedirs(args.run_dir, exist_ok=True)
    with open(os.path.join(args.run_dir, "argv.json"), "w") as f:
        json.dump({"args": vars(args), "unknown": unknown, "world_size": world_size}, f)
    with open(os.path.join(args.run_dir, "metrics.jsonl"), "w") as f:
        for update in range(1, args.total_episodes // args.batch_size + 1):
            warm = update == 1
            phases = {
                "time/generation": 0.0 if args.no_generation else (5.0 if warm else 1.0 + 0.5 * (update % 2)),
                "time/reward": 0.5,
                "time/logprob": 0.25,
                "time/update": 2.0,
            }
            record = {"update": update, **phases, "time/total": sum(phases.values()) + 0.25}
            record["memory/peak_gb"] = 9.0 if warm else 1.0 + 0.5 * (update % 2)
            if args.no_generation:
                del record["time/generation"]
            f.write(json.dumps(record) + "\n")
