"""A tiny offline stand-in for the chat setting of the paper (Section 4.2): a Llama-3-Instruct-like policy, a reward
model of another family with its own tokenizer and chat template (Starling-RM-like), and UltraFeedback-like
conversation data, all built from configs (no hub access).

The two tokenizers are word-level (toy.tldr.build_tokenizer) over the same words but give them different ids, have
different lengths, and differ in their special tokens:

* policy: eos == pad == bos == "<|endoftext|>" (Llama-3 ships no pad token; the usual fix is pad = eos), plus added
  special tokens "<|start_header_id|>", "<|end_header_id|>" and the end-of-turn "<|eot_id|>", which the
  generation config stops on besides the eos (as Llama-3-Instruct's does). Its input embedding has exactly
  len(tokenizer) rows, so a script that adds a pad token must resize it.
* reward model: eos == bos == "</s>" (an added special token, with a different id from the policy's eos), pad "[PAD]";
  "<|eot_id|>" and the header tokens are not in its vocabulary (they would be <unk>).
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from eval_helpers import END_OF_TURN, best_summary, tiny_llama_config, toy_queries

from toy.tldr import EVENTS, FEELINGS, FILLERS, PERSONS, QUESTIONS, SUBREDDITS, build_tokenizer, make_splits

START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
RM_EOS = "</s>"
# Llama-3's template without the leading <|begin_of_text|> (here bos == pad, so a leading bos would read as padding).
POLICY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ '\\n\\n' }}{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}{% endif %}"
)
# A Starling/Nectar-like template: "Human: ...\n\nAssistant: ... </s>". Newlines are Jinja string literals because
# transformers renders chat templates with trim_blocks=True, which drops a newline written right after a block tag.
RM_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if m['role'] == 'user' %}Human: {{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }} {{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\n' }}Assistant:{% endif %}"
)
CHAT_WORDS = "user assistant system what is the capital of france ? tell me a story write a poem hello thanks"
RM_EXTRA_WORDS = ["Human:", "Assistant:", "GPT4", "Correct", "User:"]
N_TRAIN, N_VALIDATION = 64, 16


def _conversations(seed: int = 0) -> dict[str, list[dict]]:
    """Rows per split: `messages` (the toy post as the user turn, its reference summary as the assistant turn) and
    `prompt` (the user turn as a plain string)."""
    sft, _ = make_splits(seed, n_train=N_TRAIN, n_validation=N_VALIDATION, n_test=1, n_pref=1)
    return {
        split: [
            {
                "messages": [
                    {"role": "user", "content": r["query"]},
                    {"role": "assistant", "content": r["reference_response"].strip()},
                ],
                "prompt": r["query"],
            }
            for r in sft[split]
        ]
        for split in ("train", "validation")
    }


def _corpus(splits: dict[str, list[dict]]) -> list[str]:
    """Every word a toy post or summary can use (not only those in this data), and some chat words."""
    every_word = FILLERS + PERSONS + EVENTS + FEELINGS + QUESTIONS + ["did something", "SUBREDDIT: TITLE: POST: TL;DR:"]
    every_word += [f"r/{s}" for s in SUBREDDITS]
    texts = [m["content"] for rows in splits.values() for r in rows for m in r["messages"]]
    texts += [q + best_summary(q) for q in toy_queries(8)]
    return texts + [" ".join(every_word), CHAT_WORDS]


def _policy_tokenizer(corpus: list[str]):
    tokenizer = build_tokenizer(corpus)
    tokenizer.add_special_tokens({"additional_special_tokens": [START_HEADER, END_HEADER, END_OF_TURN]})
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = POLICY_CHAT_TEMPLATE
    return tokenizer


def _reward_tokenizer(policy_tokenizer):
    """The policy's words in the reverse order of their ids, after a few words of its own, so that almost every word
    has another id (each word is repeated so that the trainer's frequency order is exactly this order)."""
    special = set(policy_tokenizer.all_special_tokens) | {"[PAD]"}
    vocab = policy_tokenizer.get_vocab()
    words = [w for w in sorted(vocab, key=vocab.get) if w not in special]
    words = RM_EXTRA_WORDS + words[::-1]
    tokenizer = build_tokenizer([" ".join([w] * (len(words) - i)) for i, w in enumerate(words)])
    tokenizer.add_special_tokens({"eos_token": RM_EOS, "bos_token": RM_EOS})  # pad stays build_tokenizer's "[PAD]"
    tokenizer.chat_template = RM_CHAT_TEMPLATE
    return tokenizer


def build_chat_task(root) -> SimpleNamespace:
    """Write <root>/policy, <root>/reward_model (save_pretrained directories with their tokenizers) and <root>/data
    (train.jsonl, validation.jsonl); return their paths and the policy's end-of-turn token."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification, LlamaForCausalLM

    root = str(root)
    paths = SimpleNamespace(
        policy=os.path.join(root, "policy"),
        reward_model=os.path.join(root, "reward_model"),
        data=os.path.join(root, "data"),
        eot=END_OF_TURN,
    )
    splits = _conversations()
    os.makedirs(paths.data, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(paths.data, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    tokenizer = _policy_tokenizer(_corpus(splits))
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)
    torch.manual_seed(0)
    config = tiny_llama_config(
        len(tokenizer), tie_word_embeddings=False, bos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[eos, eot],
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [eos, eot]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(paths.policy)
    tokenizer.save_pretrained(paths.policy)

    rm_tokenizer = _reward_tokenizer(tokenizer)
    torch.manual_seed(1)
    rm_config = GPTNeoXConfig(
        vocab_size=len(rm_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=256,
        num_labels=1,
        bos_token_id=rm_tokenizer.eos_token_id,
        eos_token_id=rm_tokenizer.eos_token_id,
        pad_token_id=rm_tokenizer.pad_token_id,
    )
    GPTNeoXForSequenceClassification(rm_config).save_pretrained(paths.reward_model)
    rm_tokenizer.save_pretrained(paths.reward_model)
    return paths
