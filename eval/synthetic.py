"""Random-weight models of the paper's sizes and random-token prompts, written offline, for benchmarks on machines
that cannot download the real checkpoints and datasets.

Runtime and memory depend on the shapes of the models and of the batches, not on what the weights or the words are.
This module writes, with no network access, everything `--sft_model_path`, `--reward_model_path`, `--query_dataset`
(and dpo.py's `--preference_dataset`) expect, at the exact shape of a real model:

* `policy/`: a randomly initialised causal LM whose config has the real model's sizes (`save_pretrained`, bf16),
  with the tokenizer beside it (the scripts load the tokenizer from `--sft_model_path`);
* `reward_model/`: an AutoModelForSequenceClassification with one label, of the same shape (bf16);
* the tokenizer: a word-level vocabulary `t3 .. t<V-1>` plus `<|endoftext|>` (0, EOS and BOS), `<|pad|>` (1) and
  `<unk>` (2), exactly as many entries as the model has embedding rows. Any sequence of ordinary ids decodes to
  words that encode back to the same ids, so a prompt of n random words is exactly n tokens;
* `prompts.jsonl`: `rows` random-token prompts of `query_length - QUERY_MARGIN` tokens (the TL;DR setting: prompts
  of up to 512 tokens, so none is dropped as too long), with `reference_response`, `chosen` and `rejected`
  responses of `response_length - 1` tokens (the scripts append EOS). One file serves every split.

    python -m eval.synthetic --shape pythia-2.8b --out synthetic_2.8b --rows 6144
    python -m eval.benchmark --synthetic pythia-2.8b ...       # builds (or reuses) it and runs the scripts on it

Cost of the large shapes (written once, then reused): initialisation runs on the CPU, one model at a time, in bf16:
about 2 bytes of RAM per parameter for the model plus one safetensors shard while saving (16 GB for Llama-3-8B),
and 2 bytes of disk per parameter per model (policy and reward model: 32 GB for Llama-3-8B). docs/eval.md has a
measured time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

# The public config.json of each model, as far as it sets the shape. Pythia 1.4B and 2.8B have 50304 embedding rows,
# 6.9B has 50432 (its tokenizer has 50277 tokens in both cases).
PYTHIA = {
    "model_type": "gpt_neox",
    "architectures": ["GPTNeoXForCausalLM"],
    "rotary_pct": 0.25,
    "rotary_emb_base": 10000,
    "use_parallel_residual": True,
    "max_position_embeddings": 2048,
    "layer_norm_eps": 1e-5,
    "hidden_act": "gelu",
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
}
LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
}
SHAPES = {
    # For tests and CI: builds and trains in seconds on a CPU.
    "tiny": {**PYTHIA, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 256},
    "tiny-llama": {**LLAMA, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 224, "max_position_embeddings": 2048},
    "pythia-1.4b": {**PYTHIA, "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 24,
                    "num_attention_heads": 16, "intermediate_size": 8192},
    "pythia-2.8b": {**PYTHIA, "vocab_size": 50304, "hidden_size": 2560, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "intermediate_size": 10240},
    "pythia-6.9b": {**PYTHIA, "vocab_size": 50432, "hidden_size": 4096, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "intermediate_size": 16384},
    "llama-3-8b": {**LLAMA, "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                   "max_position_embeddings": 8192},
}  # fmt: skip
EOS, PAD, UNK = "<|endoftext|>", "<|pad|>", "<unk>"
SPECIAL_TOKENS = [EOS, PAD, UNK]  # ids 0, 1, 2; random text uses the ids after them
QUERY_MARGIN = 1
"""prompts are this many tokens shorter than --query_length: room for a BOS, should a tokenizer add one"""


def model_config(shape: str, reward: bool = False):
    """The transformers config of `shape`, with the synthetic tokenizer's special ids; `reward`: one output label."""
    from transformers import AutoConfig

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    return AutoConfig.for_model(**SHAPES[shape], **ids, **({"num_labels": 1} if reward else {}))


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer with exactly `vocab_size` entries: the special tokens, then "t<id>" for every other id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces (as toy/tldr.py)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK)


def random_text(rng: random.Random, num_tokens: int, vocab_size: int) -> str:
    """`num_tokens` random ordinary tokens (never a special one), as text the tokenizer maps back to them exactly."""
    return " " + " ".join(f"t{rng.randrange(len(SPECIAL_TOKENS), vocab_size)}" for _ in range(num_tokens))


def write_prompts(path: str, vocab_size: int, rows: int, query_length: int, response_length: int, seed: int) -> None:
    rng = random.Random(seed)
    query_tokens, response_tokens = query_length - QUERY_MARGIN, response_length - 1
    if query_tokens < 1 or response_tokens < 1:
        raise ValueError(f"query_length must be > {QUERY_MARGIN} and response_length > 1")
    with open(path, "w") as f:
        for _ in range(rows):
            row = {"query": random_text(rng, query_tokens, vocab_size)}
            for column in ("reference_response", "chosen", "rejected"):
                row[column] = random_text(rng, response_tokens, vocab_size)
            f.write(json.dumps(row) + "\n")


def write_model(shape: str, path: str, reward: bool, seed: int, tokenizer, device: str = "cpu") -> None:
    """A random-initialised model of `shape`, created and saved in bf16: 2 bytes per parameter of RAM, not 4. On a GPU
    (`device="cuda"`) the random initialisation is much faster than on a CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(model_config(shape, reward), dtype=torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def build(
    shape: str,
    out: str,
    query_length: int = 512,
    response_length: int = 53,
    rows: int = 1024,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Write the models, tokenizer and prompts of `shape` into `out`; models already there for the same shape and
    seed are kept (they are what takes time), the prompts are always rewritten (they take seconds).
    Returns the manifest, also saved as `out/synthetic.json`."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")
    os.makedirs(out, exist_ok=True)
    manifest_path = os.path.join(out, "synthetic.json")
    old = {}
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
    manifest = {
        "shape": shape,
        "seed": seed,
        "policy": os.path.join(out, "policy"),
        "reward_model": os.path.join(out, "reward_model"),
        "prompts": os.path.join(out, "prompts.jsonl"),
        "rows": rows,
        "query_length": query_length,
        "response_length": response_length,
        "build_seconds": old.get("build_seconds", {}),
    }
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
    same_models = (old.get("shape"), old.get("seed")) == (shape, seed)
    for name, reward, model_seed in (("policy", False, seed), ("reward_model", True, seed + 1)):
        if same_models and os.path.exists(os.path.join(manifest[name], "config.json")):
            continue
        start = time.time()
        write_model(shape, manifest[name], reward, model_seed, tokenizer, device)
        manifest["build_seconds"][name] = round(time.time() - start, 1)
    write_prompts(manifest["prompts"], SHAPES[shape]["vocab_size"], rows, query_length, response_length, seed)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=list(SHAPES))
    parser.add_argument("--out", required=True, help="directory to write into (models there of the same shape stay)")
    parser.add_argument("--query_length", type=int, default=512, help="the scripts' --query_length")
    parser.add_argument("--response_length", type=int, default=53, help="the scripts' --response_length")
    parser.add_argument("--rows", type=int, default=1024, help="prompts in prompts.jsonl (at least one --batch_size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the weights are initialised (cuda: much faster)")
    cli = parser.parse_args()
    built = build(cli.shape, cli.out, cli.query_length, cli.response_length, cli.rows, cli.seed, cli.device)
    print(json.dumps(built, indent=2))
