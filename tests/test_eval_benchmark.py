import json
import os
import shutil
import subprocess
import sys

import pytest

from eval import BadInput
from eval.benchmark import (
    GIB,
    MEMORY_PARTS,
    Args,
    Params,
    count_params,
    main,
    memory_breakdown,
    memory_flags,
    parse_cli,
    script_command,
    summarize_run,
)
from eval.synthetic import QUERY_MARGIN, build, model_config

FAKE = os.path.join(os.path.dirname(__file__), "fake_train_script.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fake_scripts(tmp_path):
    for name in ("rebel.py", "ppo.py", "dpo.py"):
        shutil.copy(FAKE, tmp_path / name)
    return tmp_path


def test_summarize_run_discards_warmup():
    records = [
        {"update": u, "time/total": 10.0 if u == 1 else 2.0, "memory/peak_gb": 9.0 if u == 1 else 1.0}
        for u in (3, 1, 2)
    ]
    s = summarize_run(records, warmup=1)  # the warm-up is update 1 even when lines arrive out of order
    assert s["time/total"] == 2.0 and s["memory/peak_gb"] == 1.0 and s["time/generation"] == 0.0
    assert s["updates_measured"] == 2 and s["time/other"] == 2.0
    with pytest.raises(ValueError, match="raise --updates"):
        summarize_run(records, warmup=3)


def test_parse_cli_passes_extra_args_through():
    args = parse_cli(["--scripts", "rebel.py", "ppo.py", "--updates", "3", "--", "--lr", "3e-6", "--track", "True"])
    assert args.scripts == ("rebel.py", "ppo.py") and args.updates == 3
    assert args.extra_args == ("--lr", "3e-6", "--track", "True")


def test_preference_dataset_reaches_dpo_only():
    args = Args(preference_dataset="pairs.jsonl", num_eval_prompts=8)
    dpo, rebel = script_command("dpo.py", "run", args), script_command("rebel.py", "run", args)
    assert dpo[dpo.index("--preference_dataset") + 1] == "pairs.jsonl" and "--preference_dataset" not in rebel
    assert rebel[rebel.index("--num_eval_prompts") + 1] == "8"


def test_benchmark_cli_on_fake_scripts(fake_scripts, tmp_path):
    out = tmp_path / "bench"
    scripts = [str(fake_scripts / "rebel.py"), str(fake_scripts / "ppo.py")]
    command = [sys.executable, "-m", "eval.benchmark", "--scripts", *scripts, "--updates", "5", "--warmup", "1"]
    command += ["--batch_size", "4", "--query_length", "16", "--output_dir", str(out), "--", "--lr", "3e-6"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.load(open(out / "benchmark.json"))
    for r in report["results"]:
        # Updates 2-5 alternate generation 1.5 / 1.0 s and memory 1.5 / 1.0 GiB; the warm-up (5 s, 9 GiB) is gone.
        assert r["updates_measured"] == 4 and r["updates_discarded"] == 1
        assert r["time/generation"] == pytest.approx(1.25) and r["time/update"] == pytest.approx(2.0)
        assert r["time/total"] == pytest.approx(4.25) and r["time/other"] == pytest.approx(0.25)
        assert r["memory/peak_gb"] == 1.5
    argv = json.load(open(out / "runs" / "rebel" / "argv.json"))
    assert (
        argv["args"]["total_episodes"] == 20 and argv["args"]["query_length"] == 16 and argv["args"]["eval_freq"] == 0
    )
    assert argv["args"]["output_dir"] == "" and argv["args"]["track"] == "" and argv["unknown"] == ["--lr", "3e-6"]
    table = (out / "benchmark.md").read_text()
    assert "| rebel | 4 | 1.250 | 0.500 | 0.250 | 2.000 |" in table and "4.250 ± " in table and "| 1.50 |" in table
    assert (out / "benchmark.png").stat().st_size > 1000


def test_benchmark_dpo_like_failure_and_reuse(fake_scripts, tmp_path):
    out = str(tmp_path / "bench")
    dpo = Args(
        scripts=(str(fake_scripts / "dpo.py"),),
        updates=3,
        warmup=1,
        batch_size=2,
        output_dir=out,
        extra_args=("--no_generation",),
    )
    [r] = main(dpo)
    assert r["time/generation"] == 0.0 and r["time/total"] == pytest.approx(3.0)
    [again] = main(Args(scripts=dpo.scripts, warmup=2, output_dir=out, reuse=True))  # re-summarised, not rerun
    assert again["updates_measured"] == 1
    # A --scripts entry with a flag of its own: it reaches that script only, and names the run "ppo --fail".
    [failed] = main(Args(scripts=(f"{fake_scripts / 'ppo.py'} --fail",), updates=3, batch_size=2, output_dir=out))
    assert "exit code 1" in failed["error"]
    assert "failing on purpose" in open(os.path.join(out, "runs", "ppo_fail.log")).read()
    assert "| ppo --fail | failed: exit code 1" in open(os.path.join(out, "benchmark.md")).read()


def test_benchmark_torchrun_launch(fake_scripts, tmp_path):
    out = str(tmp_path / "bench")
    [r] = main(
        Args(
            scripts=(str(fake_scripts / "rebel.py"),),
            updates=3,
            warmup=1,
            batch_size=2,
            nproc_per_node=2,
            output_dir=out,
        )
    )
    assert "error" not in r, open(os.path.join(out, "runs", "rebel.log")).read()
    assert json.load(open(os.path.join(out, "runs", "rebel", "argv.json")))["world_size"] == 2


# ---------------------------------------------------------------------------------------------- synthetic scale

# Hand-counted parameters of the `tiny` shape (GPT-NeoX: 2 layers, hidden 64, MLP 256, vocab 512, untied embeddings).
# Per layer: query_key_value 64*192 + 192, dense 64*64 + 64, MLP 64*256 + 256 + 256*64 + 64, two LayerNorms 2*128:
# 49,984. Policy: 2 layers + final LayerNorm 128 + embed_in and embed_out 512*64 each = 165,632. Reward model: the
# same without embed_out, plus a 64 x 1 score head = 132,928. LoRA of rank 4 on query_key_value: 4 * (64 + 192) per
# layer = 2,048, on the policy and on the reward model's backbone alike.
TINY_POLICY, TINY_REWARD, TINY_LORA = 165_632, 132_928, 2_048


@pytest.mark.parametrize("shape", ["tiny", "tiny-llama"])
def test_synthetic_set_loads_as_the_scripts_load_it(tmp_path, shape):
    import torch

    from rebel import load_policy, load_prompts, load_reward_model, load_tokenizer

    built = build(shape, str(tmp_path / shape), query_length=32, response_length=8, rows=6)
    tokenizer = load_tokenizer(built["policy"])
    policy = load_policy(built["policy"], torch.float32)
    assert len(tokenizer) == policy.config.vocab_size == policy.get_input_embeddings().num_embeddings
    assert json.load(open(os.path.join(built["policy"], "config.json")))["dtype"] == "bfloat16"
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)  # load_tokenizer added no token of its own
    # Random ordinary ids decode to text that encodes back to the same ids: prompt lengths in tokens are exact.
    ids = torch.randint(3, len(tokenizer), (200,)).tolist()
    assert tokenizer(tokenizer.decode(ids)).input_ids == ids
    data = dict(tokenizer=tokenizer, query_length=32, response_length=8, long_prompts="filter")
    rows, _, queries, references, dropped = load_prompts(built["prompts"], "validation", "query", "chosen", **data)
    assert len(rows) == 6 and dropped == 0
    assert ((queries != tokenizer.pad_token_id).sum(1) == 32 - QUERY_MARGIN).all()
    assert (references[:, -1] == tokenizer.eos_token_id).all() and (references != tokenizer.pad_token_id).all()
    reward = load_reward_model(built["reward_model"], torch.float32)(torch.cat((queries, references), 1), 1)
    assert reward.shape == (6,) and reward.isfinite().all()
    # A second build keeps the models (the slow part for large shapes) and rewrites the prompts.
    weights = [os.path.join(built[name], "model.safetensors") for name in ("policy", "reward_model")]
    written = [os.stat(w).st_mtime_ns for w in weights]
    again = build(shape, str(tmp_path / shape), query_length=16, response_length=8, rows=3)
    assert [os.stat(w).st_mtime_ns for w in weights] == written and again["build_seconds"] == built["build_seconds"]
    assert sum(1 for _ in open(again["prompts"])) == 3


@pytest.mark.parametrize(
    "shape, total, reward_total, lora_1024",
    [
        ("pythia-1.4b", 1_414_647_808, 1_311_627_264, 201_326_592),
        ("pythia-2.8b", 2_775_208_960, 2_646_433_280, 335_544_320),
        ("pythia-6.9b", 6_857_302_016, 6_650_736_640, 536_870_912),
        # LoRA on peft's default q_proj (4096 -> 4096) and v_proj (4096 -> 1024: 8 KV heads of 128)
        ("llama-3-8b", 8_030_261_248, 7_504_928_768, 436_207_616),
    ],
)
def test_real_shapes_have_the_public_parameter_counts(shape, total, reward_total, lora_1024):
    # Pythia's counts as EleutherAI publishes them (1.41B, 2.78B, 6.86B with their 50304 or 50432 embedding rows),
    # Llama-3-8B's 8.03B; the reward model drops the LM head (vocab x hidden) and adds a 1 x hidden score head.
    # LoRA of rank 1024 (every script's default) on Pythia's query_key_value (hidden -> 3 hidden), in all layers.
    policy = count_params(model_config(shape))
    reward = count_params(model_config(shape, reward=True), reward=True)
    assert policy == Params(total, lora_1024) and reward == Params(reward_total, lora_1024)
    config = model_config(shape)
    assert reward_total == total - config.vocab_size * config.hidden_size + config.hidden_size


def test_lora_count_matches_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    assert count_params(model_config("tiny"), lora_rank=4) == Params(TINY_POLICY, TINY_LORA)
    assert count_params(model_config("tiny", reward=True), reward=True, lora_rank=4) == Params(TINY_REWARD, TINY_LORA)
    for targets in (None, ["all-linear"], ["dense"]):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(model_config("tiny"), dtype=torch.float32),
            LoraConfig(r=4, target_modules=targets[0] if targets == ["all-linear"] else targets),
        )
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert count_params(model_config("tiny"), lora_rank=4, target_modules=targets).lora == trained


def test_memory_breakdown_hand_computed():
    policy, reward = Params(TINY_POLICY, TINY_LORA), Params(TINY_REWARD, TINY_LORA)

    def bytes_of(script, **kw):
        """(weights, gradients, optimizer, reference, reward_model, critic, ddp_buckets) in bytes."""
        parts = memory_breakdown(script, policy, reward, **kw)
        assert list(parts) == MEMORY_PARTS
        return tuple(round(v * GIB) for v in parts.values())

    # LoRA, bf16: frozen base 2 x 165,632 + fp32 adapters 4 x 2,048; the reference is the base (no copy).
    assert bytes_of("rebel.py") == (339_456, 8_192, 16_384, 0, 265_856, 0, 0)
    # --no-lora: fp32 policy, its gradients and AdamW moments (4 + 4 + 8 bytes), and an fp32 reference copy (4 bytes).
    assert bytes_of("/any/dir/rloo.py", lora=False) == (662_528, 662_528, 1_325_056, 662_528, 265_856, 0, 0)
    # ppo.py: a critic of the reward model's shape (bf16 2 x 132,928 + adapters 4 x 2,048); both adapters train.
    assert bytes_of("ppo.py") == (339_456, 16_384, 32_768, 0, 265_856, 274_048, 0)
    # ppo.py --no-lora in fp32: the critic trains fully, like the policy (165,632 + 132,928 trained parameters).
    full = (662_528, 1_194_240, 2_388_480, 662_528, 531_712, 531_712, 0)
    assert bytes_of("ppo.py", lora=False, frozen_bytes=4) == full
    assert bytes_of("ppo.py", lora=False, critic_lora=True)[5] == 265_856 + 8_192
    # Under DDP (more than one process) the all-reduce buckets hold the trained gradients a second time.
    assert bytes_of("ppo.py", world_size=8)[6] == 16_384
    # sft.py: one fp32 model, fully trained; nothing else.
    assert bytes_of("sft.py") == (662_528, 662_528, 1_325_056, 0, 0, 0, 0)


def test_memory_flags_follow_the_scripts_defaults_and_tyro_spellings():
    flags = memory_flags([])
    assert (flags.lora, flags.lora_rank, flags.lora_target_modules, flags.precision) == (True, 1024, None, "auto")
    argv = ["--lora_rank", "8", "--lora_target_modules", "all-linear", "--no-lora", "--lr", "1e-3", "--no_cuda"]
    flags = memory_flags(argv + ["--critic_lora", "True"])
    assert (flags.lora, flags.lora_rank, flags.lora_target_modules, flags.cuda) == (False, 8, ["all-linear"], False)
    assert flags.critic_lora == "True" and memory_flags(["--no_lora", "--lora"]).lora


def test_benchmark_synthetic_tiny_end_to_end(tmp_path):
    """The real rebel.py on the tiny synthetic set, on CPU: timings, measured peak and the memory breakdown."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "eval.benchmark", "--synthetic", "tiny", "--scripts", "rebel.py"]
    command += ["--updates", "3", "--warmup", "1", "--batch_size", "8", "--query_length", "64"]
    command += ["--response_length", "16", "--output_dir", str(out), "--", "--lora_rank", "4", "--lora_alpha", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr + (out / "runs" / "rebel.log").read_text()
    report = json.load(open(out / "benchmark.json"))
    assert report["config"]["sft_model_path"] == str(out / "synthetic_tiny" / "policy")
    [r] = report["results"]
    assert r["updates_measured"] == 2 and r["time/generation"] > 0 and r["time/update"] > 0
    memory = r["memory"]
    # On CPU --precision auto is fp32, so the frozen base and the reward model take 4 bytes per parameter.
    assert memory["weights"] * GIB == pytest.approx(4 * TINY_POLICY + 4 * TINY_LORA)
    assert memory["reward_model"] * GIB == pytest.approx(4 * TINY_REWARD) and memory["reference"] == 0
    assert memory["peak"] == r["memory/peak_gb"] > 0
    accounted = sum(memory[k] for k in MEMORY_PARTS)
    assert memory["activations"] == pytest.approx(memory["peak"] - accounted)
    assert "| rebel | 6.2e-04 |" in (out / "benchmark.md").read_text()  # weights: (4 x 167,680) / 2^30 GiB


def test_benchmark_deletes_no_run_folder(fake_scripts, tmp_path):
    """It removed <output_dir>/runs/<script> before running: with --output_dir . that was a user's own run. A run
    folder from before is now refused, before anything runs, and left as it is."""
    mine = tmp_path / "runs" / "rebel"
    mine.mkdir(parents=True)
    (mine / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(BadInput, match=f"{mine} exists .* pass a new --output_dir, or --reuse"):
        main(Args(scripts=(str(fake_scripts / "rebel.py"),), updates=3, batch_size=2, output_dir=str(tmp_path)))
    assert (mine / "metrics.jsonl").read_text() == "mine\n" and not os.path.exists(tmp_path / "runs" / "rebel.log")
