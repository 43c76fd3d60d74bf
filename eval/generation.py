"""Chat generation shared by the AlpacaEval and MT-Bench hooks: load a trained model, apply its chat template, sample."""

from __future__ import annotations

import json
import os
import urllib.request

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval import BadInput

# The paper (Table 4, Appendix I.2.1) generates up to 1024 tokens in the general-chat experiments.
MAX_NEW_TOKENS = 1024


def load_model_and_tokenizer(model_path: str, chat_template: str = "", dtype: str = "auto", device: str = ""):
    """A `save_pretrained` directory or hub name; a peft adapter directory (adapter_config.json) is loaded on its base."""
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if not os.path.isdir(model_path) and model_path.startswith(("/", ".", "~")):
        raise BadInput(f"--model_path {model_path}: no such directory")
    if os.path.exists(os.path.join(model_path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        # An adapter directory usually has no tokenizer of its own; then the base model's is the right one.
        has_tokenizer = any(
            os.path.exists(os.path.join(model_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
        )
        tokenizer_path = model_path if has_tokenizer else model.peft_config["default"].base_model_name_or_path
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
        tokenizer_path = model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if chat_template:
        with open(chat_template) as f:
            tokenizer.chat_template = f.read()
    if not tokenizer.chat_template:
        raise BadInput(
            f"the tokenizer of {model_path} has no chat template, so instructions cannot be formatted as the model was "
            "trained to read them: pass --chat_template PATH (a Jinja template file, e.g. the one of the model you fine-tuned)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's own stop tokens (generation_config.eos_token_id, an int or a list) plus the tokenizer's EOS.

    A chat model stops on its end-of-turn token, which is often not the tokenizer's EOS (Llama-3-Instruct: <|eot_id|>,
    Gemma: <end_of_turn>); stopping only on the tokenizer's EOS lets the answer run on and invent the next turn.
    """
    configured = model.generation_config.eos_token_id
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_for_hook(args, name: str):
    """The hooks' common start: seed sampling, load args.model_path; returns (model, tokenizer, name of the run).

    The name is `name`, or else the model directory's. `args` has seed, model_path, chat_template and dtype.
    """
    least = {"batch_size": 1, "max_new_tokens": 1, "max_instructions": 0, "max_questions": 0}  # before loading
    for flag, low in least.items():
        if getattr(args, flag, low) < low:
            raise BadInput(f"--{flag} must be >= {low}; got {getattr(args, flag)}")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.chat_template, args.dtype)
    return model, tokenizer, name or os.path.basename(os.path.normpath(args.model_path))


@torch.no_grad()
def generate_chat(
    model,
    tokenizer,
    conversations: list[list[dict]],
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 8,
    partial: str = "",
) -> list[str]:
    """The assistant's next message for each conversation (a list of {"role", "content"} messages).

    Temperature 0 is greedy decoding, as in FastChat's gen_model_answer.py (which switches sampling off below 1e-4).
    Generation settings not passed here (e.g. a repetition_penalty in the model's generation_config.json) keep the
    model's values; the ones passed here (do_sample, temperature, top_p, top_k, max_new_tokens, stop ids) win.
    `partial`: a JSON Lines file that each batch's answers are appended to as they come, so that a failure part-way
    (out of memory, Ctrl-C, a pre-empted job) loses no answer already generated.
    """
    outputs = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start : start + batch_size]
        texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
        # The template already holds any special tokens it wants; adding more would double the BOS.
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        sampling = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            if temperature >= 1e-4
            else {"do_sample": False}
        )
        # As rebel.py's generate(): the pad id never reaches the model, since a model trained by the scripts may have no
        # embedding row for it (the <|pad|> they add). Pad positions are masked and fed id 0; generate() counts the
        # positions from each prompt's first real token (attention_mask.cumsum - 1); a finished answer is fed its
        # first stop id, a real token. The tokenizer's mask, not `!= pad`, as with pad == EOS the template holds EOSs.
        attention_mask = inputs["attention_mask"].bool()
        stop_ids = stop_token_ids(model, tokenizer)
        tokens = model.generate(
            input_ids=inputs["input_ids"].masked_fill(~attention_mask, 0),
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=stop_ids[0] if stop_ids else 0,  # no stop ids: no answer finishes, no filler is fed
            eos_token_id=stop_ids or None,
            **sampling,
        )
        new_tokens = tokens[:, inputs["input_ids"].shape[1] :]  # (B, T_new)
        # Everything after an answer's first stop token is filler: cut it, so that it never shows in the text.
        stopped = torch.isin(new_tokens, torch.tensor(stop_ids, dtype=torch.long, device=new_tokens.device))
        ends = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new_tokens.size(1))
        answers = [t[:end] for t, end in zip(new_tokens, ends.tolist(), strict=True)]
        outputs += [t.strip() for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]
        if partial:
            with open(partial, "a") as f:
                f.writelines(
                    json.dumps({"conversation": c, "answer": a}) + "\n" for c, a in zip(batch, outputs[start:])
                )
    return outputs


def read_records(source: str, keys: dict) -> list[dict]:
    """Records from a local .json (a list) or .jsonl file, or an http(s) URL of either; each must have `keys`
    (name -> type), checked before any model is loaded."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=60) as response:
            text = response.read().decode()
    else:
        with open(source) as f:
            text = f.read()
    try:
        lines = source.endswith(".jsonl")
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    except ValueError as e:
        raise BadInput(f"{source} is not valid JSON{' Lines' if lines else ''} ({e}); fix the file") from e
    if not isinstance(records, list) or not records:
        raise BadInput(f"{source} holds no records: give a JSON list (.json) or one JSON object a line (.jsonl)")
    for i, record in enumerate(records):
        if not isinstance(record, dict) or any(not isinstance(record.get(k), t) for k, t in keys.items()):
            want = ", ".join(f"{k} ({getattr(t, '__name__', t)})" for k, t in keys.items())
            raise BadInput(f"{source}, record {i}: {str(record)[:60]!r} lacks one of {want}; fix or drop it")
    return records


def output_file(folder: str, name: str) -> str:
    """<folder>/<name>, the folder created and written to now: one that cannot be written fails before generating."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    open(path + ".tmp", "w").close()
    os.remove(path + ".tmp")
    return path
