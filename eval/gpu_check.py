"""One prepared GPU check: the CUDA path of every LM script, sampling against its floor, the paper's Figure 2 and the
MFU of REBEL's update, in one run that needs no network and keeps to a wall-clock budget.

    python -m eval.gpu_check --out gpu_check_out          # on one GPU, within --budget_s (480 s)
    python -m eval.gpu_check --out /tmp/gpu_check --dry   # the same code on CPU with tiny shapes (CI)

The sections of the report (docs/gpu.md explains every number):

- device: the card's bf16 matmul peak (a large matmul) and memory bandwidth (a large copy), measured first. Then
  random-weight models and random-token prompts of the Pythia-1.4B shape (eval/synthetic.py), built on the GPU.
- scripts (section 1): every LM script for --updates updates in bf16 under `torchrun --nproc_per_node 1`, at the
  paper's lengths (512 + 53 tokens) and per-GPU batch (512 prompts over 8 GPUs: 64): rebel, ppo, rloo_k4, rloo
  (k=2), dpo, iterative_dpo, sft, reward, and rebel_fsdp (rebel.py --fsdp). The commands are eval/benchmark.py's,
  and so is the mean of each phase over the updates after the first. Per script: exit code, the loss/ metrics and
  whether they are finite, seconds per update by phase, peak GiB.
- sampling (section 2, run before section 1: it needs only the policy): `generate` with the dynamic and with the
  static (compiled) KV cache, batch 64, 512 prompt tokens, 53 new tokens: milliseconds per decode step, and the
  floor (the bytes a decode step reads, over the bandwidth).
- figure2 (section 3): seconds per update and peak GiB of REBEL, PPO, RLOO (k=4) and RLOO (k=2): section 1's runs,
  then the same at Pythia-2.8B if what is left of the budget allows.
- mfu (section 4): 6 x REBEL's trained parameters x the tokens of its update phase / that phase's time / bf16 peak.

Every step runs in a subprocess of its own process group, killed at the deadline (start + --budget_s); a step that
would not fit, judged by the time the ones before it took, is skipped; a failing one is recorded and the run goes on.
DIR/gpu_check.json is rewritten after every step; the logs are DIR/logs/*.log, the scripts' metrics
DIR/runs/<shape>/<script>/metrics.jsonl. The table is printed last. Exit code 1 when something failed (not when it
was skipped for time), 2 when a package the scripts import is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

from eval import print_error
from eval.benchmark import PHASES, count_params, memory_flags, read_metrics, script_command, summarize_run
from eval.benchmark import Args as BenchmarkArgs
from eval.synthetic import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
REBEL_EPOCHS, REBEL_SAMPLES = 4, 2  # rebel.py's defaults, passed explicitly: the MFU counts the tokens they imply
SCRIPTS = {  # name in gpu_check.json -> eval.benchmark --scripts entry; Figure 2's four first
    "rebel": f"rebel.py --noptepochs {REBEL_EPOCHS} --num_samples {REBEL_SAMPLES}",
    "ppo": "ppo.py",
    "rloo_k4": "rloo.py --rloo_k 4",
    "rloo": "rloo.py --rloo_k 2",
    "dpo": "dpo.py",
    "iterative_dpo": "iterative_dpo.py",
    "sft": "sft.py",
    "reward": "reward.py",
    "rebel_fsdp": f"rebel.py --noptepochs {REBEL_EPOCHS} --num_samples {REBEL_SAMPLES} --fsdp",
}
FIGURE2 = ["rebel", "ppo", "rloo_k4", "rloo"]  # the paper's order
SCRIPT_FLAGS = ("--precision", "bf16")  # bf16 autocast in every script, on CPU (--dry) too


@dataclass(frozen=True)
class Setting:
    shape: str
    """eval/synthetic.py shape of sections 1, 2 and 4"""
    large_shape: str
    """Figure 2's second shape, run if the budget allows"""
    large_scripts: tuple[str, ...]
    """what runs at large_shape"""
    query_length: int
    response_length: int
    batch_size: int
    """prompts per update (the paper's 512 over 8 GPUs; dpo.py, sft.py and reward.py: their whole batch of 64)"""
    micro_batch: int
    """--per_device_train_batch_size"""
    eval_prompts: int
    """--num_eval_prompts: the evaluation before the first and after the last update, outside the timings"""
    sample_batch: int
    matmul_size: int
    """n of the n x n x n bf16 matmul that measures the peak"""
    copy_mib: int
    """size of the copy that measures the bandwidth"""


GPU = Setting("pythia-1.4b", "pythia-2.8b", tuple(FIGURE2), 512, 53, 64, 8, 8, 64, 8192, 2048)
DRY = Setting("tiny", "tiny-llama", ("rebel",), 32, 8, 4, 2, 2, 4, 256, 32)  # seconds per step on a CPU


# ---------------------------------------------------------------------------------------------- subprocesses


def run_logged(command: list[str], log_path: str, deadline: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run `command` from the repository root in a process group of its own, output to `log_path`. At `deadline`
    (time.time()) the whole group (torchrun and its workers) is killed. Returns (exit code, or None when killed at
    the deadline; wall seconds)."""
    start = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.time()))
        except BaseException:  # the deadline, or Ctrl-C / SIGTERM of this process: nothing may keep the device
            os.killpg(proc.pid, signal.SIGKILL)  # proc is not reaped yet, so its group id is still ours
            proc.wait()
            if not isinstance(sys.exc_info()[1], subprocess.TimeoutExpired):
                raise
            code = None
    return code, time.time() - start


def check_script(spec: str, run_dir: str, bench: BenchmarkArgs, deadline: float, env: dict | None = None) -> dict:
    """One script under eval.benchmark's command line for `bench`: exit code, loss/ metrics, time per phase (mean
    over the updates after the first), peak GiB (max over every update), and `ok`."""
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)  # --out is new or empty: so is run_dir
    command = script_command(spec, run_dir, bench)
    code, wall = run_logged(command, run_dir + ".log", deadline, env)
    result = {"command": shlex.join(command), "log": run_dir + ".log", "exit_code": code, "wall_s": round(wall, 1)}
    if code is None:
        return {**result, "ok": False, "killed": True, "error": f"killed at the deadline after {wall:.0f} s"}
    try:
        records = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        summary = summarize_run(records, warmup=1)
    except (OSError, ValueError, KeyError) as e:
        return {**result, "ok": False, "error": f"exit code {code}; no metrics ({type(e).__name__}: {e})"}
    losses = {k: v for k, v in records[-1].items() if k.startswith("loss/")}
    finite = bool(losses) and all(
        math.isfinite(float(v)) for r in records for k, v in r.items() if k.startswith("loss/")
    )
    phases = {k: summary[f"time/{k}"] for k in [*PHASES, "other"]}
    result.update(
        ok=code == 0 and finite and len(records) == bench.updates,
        updates=len(records),
        loss=losses,
        loss_finite=finite,
        # sft.py and reward.py time their update phase only
        s_per_update=summary["time/total"] or sum(phases.values()),
        phases=phases,
        peak_gb=max(float(r.get("memory/peak_gb") or 0.0) for r in records),
    )
    if code != 0:
        result["error"] = f"exit code {code}"
    elif not finite:
        result["error"] = "non-finite or missing loss"
    elif not result["ok"]:
        result["error"] = f"{len(records)} of {bench.updates} updates"
    return result


# ---------------------------------------------------------------------------------------------- probes (subprocesses)


def timed(fn, reps: int, device, warm_up: bool = True) -> float:
    """Mean seconds of fn() over `reps` calls (after one untimed call with `warm_up`), synchronising CUDA."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warm_up:
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def probe_device(setting: Setting, device) -> dict:
    """The card: name, versions, memory; bf16 matmul peak in TFLOP/s and copy bandwidth in GB/s, measured."""
    import peft
    import torch
    import transformers

    n = setting.matmul_size
    a, b, c = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(3))
    matmul_s = timed(lambda: torch.mm(a, b, out=c), 20, device)
    src = torch.empty(setting.copy_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), 20, device)
    cuda = device.type == "cuda"
    return {
        "name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "kind": device.type,
        "memory_gb": torch.cuda.get_device_properties(device).total_memory / GIB if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bf16_peak_tflops": 2 * n**3 / matmul_s / 1e12,
        "matmul_size": n,
        "bandwidth_gb_s": 2 * src.numel() / copy_s / 1e9,  # every byte read once and written once
        "copy_bytes": src.numel(),
    }


def probe_sampling(setting: Setting, device, policy_path: str) -> dict:
    """`generate` as the scripts call it (forced length, sampling at temperature 0.7, the checkpoint's own
    generation_config set aside), with the dynamic and with the static KV cache; a prefill forward alone; and the
    bytes a decode step must read at least."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.bfloat16).to(device).eval()
    model.generation_config = GenerationConfig()
    config = model.config
    batch, prompt, new = setting.sample_batch, setting.query_length, setting.response_length
    queries = torch.randint(3, config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(queries)
    result = {"batch": batch, "prompt_tokens": prompt, "new_tokens": new}
    with torch.no_grad():
        result["prefill_s"] = timed(lambda: model(queries, attention_mask=mask, logits_to_keep=1), 2, device)
        for name, cache in (("dynamic", None), ("static", "static")):
            sampling = GenerationConfig(
                cache_implementation=cache,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=True,
                temperature=0.7,
                top_k=0,
                top_p=1.0,
                pad_token_id=1,
                suppress_tokens=[1],
            )
            first = partial(model.generate, input_ids=queries, attention_mask=mask, generation_config=sampling)
            result[f"{name}_first_call_s"] = timed(first, 1, device, warm_up=False)  # the static cache compiles here
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(first, 2, device, warm_up=False)  # the first call was the warm-up
            result[f"{name}_generate_s"] = seconds
            # the first new token comes out of the prefill; the other new - 1 are decode steps
            result[f"{name}_ms_per_token"] = max(0.0, seconds - result["prefill_s"]) / (new - 1) * 1000
            result[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    # A decode step reads every weight it multiplies (all but the input embedding, a row lookup) and the KV cache
    # so far: on average the prompt and half the new tokens, K and V, in bf16.
    weights = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    result["weight_bytes"] = 2 * weights
    result["kv_cache_bytes"] = int(batch * (prompt + new / 2) * 2 * config.num_hidden_layers * kv_heads * head_dim * 2)
    return result


# ---------------------------------------------------------------------------------------------- the check


def rebel_mfu(rebel: dict, setting: Setting, peak_tflops: float | None) -> dict:
    """MFU of REBEL's update phase: 6 x trained parameters x tokens / time / peak. With LoRA the frozen base's
    matmuls run too (forward and input gradients: 4 x all parameters per token), which mfu_all_matmuls counts."""
    flags = memory_flags(shlex.split(SCRIPTS["rebel"])[1:] + list(SCRIPT_FLAGS))
    params = count_params(
        model_config(setting.shape), lora_rank=flags.lora_rank, target_modules=flags.lora_target_modules
    )
    trained = params.lora if flags.lora else params.total
    every = params.total + (params.lora if flags.lora else 0)
    tokens = REBEL_EPOCHS * setting.batch_size * REBEL_SAMPLES * (setting.query_length + setting.response_length)
    seconds = (rebel.get("phases") or {}).get("update")
    out = {"trained_params": trained, "all_params": every, "tokens": tokens, "update_s": seconds}
    out["peak_tflops"] = peak_tflops
    usable = bool(seconds) and bool(peak_tflops)
    out["mfu"] = 6 * trained * tokens / seconds / (peak_tflops * 1e12) if usable else None
    out["mfu_all_matmuls"] = (4 * every + 2 * trained) * tokens / seconds / (peak_tflops * 1e12) if usable else None
    return out


def benchmark_args(built: dict, setting: Setting, updates: int) -> BenchmarkArgs:
    """eval.benchmark's configuration of every script: `built` (eval.synthetic.build's manifest) at `setting`."""
    return BenchmarkArgs(
        updates=updates,
        torchrun=True,
        sft_model_path=built["policy"],
        reward_model_path=built["reward_model"],
        query_dataset=built["prompts"],
        preference_dataset=built["prompts"],
        num_eval_prompts=setting.eval_prompts,
        query_length=setting.query_length,
        response_length=setting.response_length,
        batch_size=setting.batch_size,
        per_device_train_batch_size=setting.micro_batch,
        extra_args=SCRIPT_FLAGS,
    )


def figure2_row(result: dict) -> dict:
    if not result.get("ok"):
        return {"ok": False, "error": result.get("error") or result.get("skipped")}
    return {
        "ok": True,
        "s_per_update": result["s_per_update"],
        "phases": result["phases"],
        "peak_gb": result["peak_gb"],
    }


class Check:
    """The run's state: the deadline, what has been measured, skipped and failed; saved after every step."""

    def __init__(self, out: str, setting: Setting, budget_s: float, dry: bool, updates: int):
        self.out, self.setting, self.dry, self.updates = out, setting, dry, updates
        self.start, self.deadline = time.time(), time.time() + budget_s
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
        if dry:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a machine with a GPU
        self.report = {
            "device": None,
            "dry": dry,
            "budget_s": budget_s,
            "settings": {**asdict(setting), "updates": updates, "script_flags": list(SCRIPT_FLAGS)},
            "scripts": {},
            "sampling": {
                k: None
                for k in ("dynamic_ms_per_token", "static_ms_per_token", "floor_ms_per_token", "static_over_floor")
            },
            "figure2": {},
            "mfu": None,
            "skipped": [],
            "failed": [],
        }
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, message: str) -> None:
        print(f"[{time.time() - self.start:5.0f} s] {message}", flush=True)

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.time() - self.start, 1)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as f:
            json.dump(self.report, f, indent=2)

    def skip(self, step: str, reason: str) -> None:
        self.report["skipped"].append({"step": step, "reason": reason})
        self.log(f"{step}: skipped ({reason})")
        self.save()

    def overrun(self, step: str, estimate_s: float) -> str | None:
        """None when `step`, expected to take `estimate_s`, fits in what is left; else it is skipped, and why."""
        left = self.left()
        if left > max(estimate_s, 1.0):
            return None
        reason = f"needs about {estimate_s:.0f} s, {max(left, 0):.0f} s of the budget left"
        self.skip(step, reason)
        return reason

    def subprocess(self, step: str, command: list[str]) -> bool:
        """A step that is one command (a probe, a build): True when it exited 0; recorded as failed or killed."""
        log = os.path.join(self.out, "logs", f"{step}.log")
        code, wall = run_logged(command, log, self.deadline, self.env)
        if code == 0:
            self.log(f"{step}: done in {wall:.0f} s")
            return True
        if code is None:
            self.skip(step, f"killed at the deadline after {wall:.0f} s")
        else:
            self.report["failed"].append({"step": step, "error": f"exit code {code}, see {log}"})
            self.log(f"{step}: FAILED with exit code {code}, see {log}")
        self.save()
        return False

    def probe(self, kind: str, extra: list[str] = ()) -> dict | None:
        command = [sys.executable, "-m", "eval.gpu_check", "--probe", kind, "--out", self.out, *extra]
        if not self.subprocess(f"probe_{kind}", command + (["--dry"] if self.dry else [])):
            return None
        with open(os.path.join(self.out, f"probe_{kind}.json")) as f:
            return json.load(f)

    def build(self, shape: str) -> dict | None:
        """eval/synthetic.py's models and prompts (updates x batch rows: every script trains `updates` updates)."""
        s, out = self.setting, os.path.join(self.out, f"synthetic_{shape}")
        command = [sys.executable, "-m", "eval.synthetic", "--shape", shape, "--out", out, "--rows"]
        command += [str(self.updates * s.batch_size), "--query_length", str(s.query_length), "--response_length"]
        command += [str(s.response_length), "--device", "cpu" if self.dry else "cuda"]
        if not self.subprocess(f"build_{shape}", command):
            return None
        with open(os.path.join(out, "synthetic.json")) as f:
            return json.load(f)

    def script(self, name: str, shape: str, bench: BenchmarkArgs) -> dict:
        result = check_script(
            SCRIPTS[name], os.path.join(self.out, "runs", shape, name), bench, self.deadline, self.env
        )
        if result.get("killed"):
            self.skip(f"{shape} {name}", result["error"])
        elif not result["ok"]:
            self.report["failed"].append(
                {"step": f"{shape} {name}", "error": f"{result['error']}, see {result['log']}"}
            )
        status = "ok" if result["ok"] else f"FAILED ({result['error']})"
        if "s_per_update" in result:
            status += f", {result['s_per_update']:.2f} s/update, peak {result['peak_gb']:.2f} GiB"
        self.log(f"{shape} {name}: {status} in {result['wall_s']:.0f} s")
        self.save()
        return result


def run_check(out: str, dry: bool, budget_s: float, updates: int, names: list[str]) -> dict:
    setting = DRY if dry else GPU
    check = Check(out, setting, budget_s, dry, updates)
    report, shape = check.report, setting.shape
    for name in SCRIPTS:
        reason = "not run" if name in names else "not selected (--scripts)"
        report["scripts"][name] = {"ok": False, "s_per_update": None, "peak_gb": None, "skipped": reason}

    # The card, and the models of the main shape.
    report["device"] = check.probe("device") or {"name": None, "bf16_peak_tflops": None, "bandwidth_gb_s": None}
    peak, bandwidth = report["device"]["bf16_peak_tflops"], report["device"]["bandwidth_gb_s"]
    built = check.build(shape) if check.left() > 1 else None
    if built is None:
        check.skip("scripts, sampling, figure2", f"no synthetic {shape} models")

    # Section 2, sampling, runs first: it needs only the policy, and takes under a minute.
    sampling = check.probe("sampling", ["--policy", built["policy"]]) if built and check.left() > 1 else None
    if sampling:
        decode_bytes = sampling["weight_bytes"] + sampling["kv_cache_bytes"]
        floor = decode_bytes / (bandwidth * 1e9) * 1000 if bandwidth else None
        sampling.update(floor_ms_per_token=floor, bandwidth_gb_s=bandwidth)
        sampling["static_over_floor"] = sampling["static_ms_per_token"] / floor if floor else None
        report["sampling"] = sampling
        check.save()
    elif built and check.left() <= 1:
        check.skip("probe_sampling", "no budget left")

    # Section 1: every LM script. One is skipped when the median time of those before it is more than is left.
    walls = []
    for name in [n for n in SCRIPTS if n in names] if built else []:
        if walls and (reason := check.overrun(f"{shape} {name}", statistics.median(walls))):
            report["scripts"][name]["skipped"] = reason
            continue
        report["scripts"][name] = result = check.script(name, shape, benchmark_args(built, setting, updates))
        walls.append(result["wall_s"])

    # Section 3: Figure 2 from section 1's runs; then at the large shape, if the time those took, scaled by the
    # number of parameters, is left.
    report["figure2"][shape] = {name: figure2_row(report["scripts"][name]) for name in FIGURE2 if name in names}
    large = setting.large_shape
    done = {n: report["scripts"][n]["wall_s"] for n in setting.large_scripts if report["scripts"][n].get("wall_s")}
    scale = count_params(model_config(large)).total / count_params(model_config(shape)).total
    reason = check.overrun(f"figure2 {large}", scale * sum(done.values())) if done else "no run at the main shape"
    built_large = None if reason else check.build(large)
    report["figure2"][large] = {} if built_large else {"skipped": reason or f"no synthetic {large} models"}
    for name in done if built_large else []:
        if reason := check.overrun(f"{large} {name}", scale * done[name]):
            report["figure2"][large][name] = {"ok": False, "error": reason}
        else:
            report["figure2"][large][name] = figure2_row(
                check.script(name, large, benchmark_args(built_large, setting, updates))
            )

    # Section 4: the MFU of REBEL's update phase.
    report["mfu"] = rebel_mfu(report["scripts"]["rebel"], setting, peak)
    check.save()
    print(format_table(report))
    return report


# ---------------------------------------------------------------------------------------------- the table


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def format_table(report: dict) -> str:
    """The report as one Markdown table: section, what, result."""
    d, s, m = report["device"] or {}, report["sampling"], report["mfu"] or {}
    device = (
        f"bf16 matmul {fmt(d.get('bf16_peak_tflops'), '.1f')} TFLOP/s, copy {fmt(d.get('bandwidth_gb_s'), '.0f')} GB/s"
    )
    rows = [("device", d.get("name") or "not measured", device)]
    for name, r in report["scripts"].items():
        if "exit_code" not in r:
            result = f"skipped: {r['skipped']}"
        else:
            result = "ok" if r["ok"] else r["error"] if r.get("killed") else f"FAILED: {r['error']}"
        if "phases" in r:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items() if v)
            loss = ", ".join(f"{k} {v:.3g}" for k, v in r["loss"].items())
            result += f"; {r['s_per_update']:.2f} s/update ({phases}); peak {r['peak_gb']:.2f} GiB; {loss}"
        rows.append(("scripts", name, result))
    for cache in ("dynamic", "static"):
        first = s.get(f"{cache}_first_call_s")
        first = f" (first call {first:.1f} s)" if first is not None else ""
        rows.append(("sampling", f"{cache} cache", f"{fmt(s.get(f'{cache}_ms_per_token'))} ms/token{first}"))
    floor = (
        f"{fmt(s.get('floor_ms_per_token'), '.3f')} ms/token; static cache {fmt(s.get('static_over_floor'), '.1f')}x"
    )
    rows.append(("sampling", "decode floor", floor))
    for shape, table in report["figure2"].items():
        if "skipped" in table:
            rows.append(("figure2", shape, f"skipped: {table['skipped']}"))
            continue
        for name, r in table.items():
            value = f"{r['s_per_update']:.2f} s/update, peak {r['peak_gb']:.2f} GiB" if r["ok"] else r["error"]
            rows.append(("figure2", f"{shape} {name}", value))
    formula = f"6 x {m.get('trained_params', 0) / 1e6:.0f}M trained x {m.get('tokens', 0)} tokens"
    formula += f" / {fmt(m.get('update_s'))} s / {fmt(m.get('peak_tflops'), '.1f')} TFLOP/s"
    mfu = f"{fmt(m.get('mfu'), '.1%')} ({formula}); all matmuls {fmt(m.get('mfu_all_matmuls'), '.1%')}"
    rows.append(("mfu", "rebel update phase", mfu))
    rows += [("skipped", skipped["step"], skipped["reason"]) for skipped in report["skipped"]]
    lines = ["| section | what | result |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    tail = f"{len(report['failed'])} failed, {len(report['skipped'])} skipped, {report['elapsed_s']:.0f} s"
    return "\n".join(lines) + f"\n\n{tail} (budget {report['budget_s']:.0f} s)"


# ---------------------------------------------------------------------------------------------- command line


def missing_packages() -> list[str]:
    """What the scripts import that this Python lacks (the GPU image lacks tyro, datasets and wandb; docs/gpu.md)."""
    import importlib

    missing = []
    for module in ("tyro", "datasets", "peft", "transformers", "torch.utils.tensorboard"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{module} ({e})")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where gpu_check.json, logs/, runs/ and the models go")
    parser.add_argument("--dry", action="store_true", help="on CPU with tiny shapes: the numbers mean nothing")
    parser.add_argument("--budget_s", type=float, default=480, help="wall-clock limit; steps past it are killed")
    parser.add_argument("--updates", type=int, default=2, help="updates per script; the first is discarded")
    parser.add_argument("--scripts", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS), help="a subset")
    parser.add_argument("--probe", choices=["device", "sampling"], help=argparse.SUPPRESS)  # one step, run by the check
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    cli = parser.parse_args(argv)
    cli.out = os.path.abspath(cli.out)  # the steps run from the repository root
    setting = DRY if cli.dry else GPU

    if cli.probe:
        import torch

        device = torch.device("cuda" if torch.cuda.is_available() and not cli.dry else "cpu")
        result = probe_device(setting, device) if cli.probe == "device" else probe_sampling(setting, device, cli.policy)
        with open(os.path.join(cli.out, f"probe_{cli.probe}.json"), "w") as f:
            json.dump(result, f, indent=2)
        return 0

    missing = missing_packages()
    if missing:
        print(f"error: missing Python packages: {'; '.join(missing)}. Install the wheels of docs/gpu.md first.")
        return 2
    import torch

    if not cli.dry and not torch.cuda.is_available():
        print("error: no CUDA device: run with --dry on a machine without a GPU")
        return 2
    if os.path.isdir(cli.out) and os.listdir(cli.out):  # it writes, and deletes, nothing of an earlier check
        print(f"error: --out {cli.out} is not empty: give a new or empty folder")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a clean exit kills the running step (run_logged)
    os.makedirs(cli.out, exist_ok=True)
    report = run_check(cli.out, cli.dry, cli.budget_s, cli.updates, cli.scripts)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.excepthook = print_error  # bad input or a failed read or write: one line, no traceback
    sys.exit(main())
