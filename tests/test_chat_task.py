"""The offline chat task (tests/chat_task.py): a Llama-3-Instruct-like policy, a reward model of another family with
its own tokenizer and chat template, and conversation data."""

import pytest
from chat_task import build_chat_task

CONVERSATION = [
    {"role": "user", "content": "what is the capital of france ?"},
    {"role": "assistant", "content": "hello thanks ."},
]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from transformers import AutoTokenizer

    task = build_chat_task(tmp_path_factory.mktemp("chat_task"))
    task.policy_tokenizer = AutoTokenizer.from_pretrained(task.policy)
    task.rm_tokenizer = AutoTokenizer.from_pretrained(task.reward_model)
    return task


def test_tokenizers_differ(task):
    pol, rm = task.policy_tokenizer, task.rm_tokenizer
    assert len(pol) != len(rm)
    text = "my boss read my diary . i feel hurt . what should i do ?"
    assert pol(text)["input_ids"] != rm(text)["input_ids"]
    assert pol.unk_token_id not in pol(text)["input_ids"] and rm.unk_token_id not in rm(text)["input_ids"]
    shared = set(pol.get_vocab()) & set(rm.get_vocab()) - set(pol.all_special_tokens) - set(rm.all_special_tokens)
    same_id = [w for w in shared if pol.convert_tokens_to_ids(w) == rm.convert_tokens_to_ids(w)]
    assert len(shared) > 100 and len(same_id) <= 1, same_id
    # Special tokens: Llama-3's pad is its eos; the reward model has its own eos and pad, and no end-of-turn token.
    assert pol.pad_token_id == pol.eos_token_id
    assert pol.convert_tokens_to_ids(task.eot) not in (pol.unk_token_id, pol.eos_token_id)
    assert task.eot in pol.all_special_tokens
    assert rm.pad_token_id is not None and rm.pad_token_id != rm.eos_token_id
    assert rm.eos_token_id != pol.eos_token_id
    assert rm.convert_tokens_to_ids(task.eot) == rm.unk_token_id


def test_policy_model(task):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    pol = task.policy_tokenizer
    model = AutoModelForCausalLM.from_pretrained(task.policy)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.config.num_attention_heads == 2 and not model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape[0] == len(pol)
    eot = pol.convert_tokens_to_ids(task.eot)
    assert model.generation_config.eos_token_id == [pol.eos_token_id, eot]


def test_chat_templates(task):
    pol, rm = task.policy_tokenizer, task.rm_tokenizer
    assert pol.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|start_header_id|>user<|end_header_id|>\n\nwhat is the capital of france ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello thanks .<|eot_id|>"
    )
    prompt = pol.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|start_header_id|>user<|end_header_id|>\n\nwhat is the capital of france ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    tokens = pol.convert_ids_to_tokens(pol(prompt)["input_ids"])
    assert tokens == ["<|start_header_id|>", "user", "<|end_header_id|>", "what", "is", "the", "capital", "of",
                      "france", "?", "<|eot_id|>", "<|start_header_id|>", "assistant", "<|end_header_id|>"]  # fmt: skip
    assert rm.apply_chat_template(CONVERSATION, tokenize=False) == (
        "Human: what is the capital of france ?\n\nAssistant: hello thanks . </s>"
    )
    assert rm.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True) == (
        "Human: what is the capital of france ?\n\nAssistant:"
    )
    ids = rm(rm.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]
    assert ids[-1] == rm.eos_token_id and rm.unk_token_id not in ids


def test_data(task):
    from datasets import load_dataset

    pol, rm = task.policy_tokenizer, task.rm_tokenizer
    splits = {split: load_dataset(task.data, split=split) for split in ("train", "validation")}
    assert {split: len(ds) for split, ds in splits.items()} == {"train": 64, "validation": 16}
    for ds in splits.values():
        for row in ds:
            user, assistant = row["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert row["prompt"] == user["content"] and user["content"].startswith("SUBREDDIT: r/")
            assert assistant["content"] and assistant["content"] == assistant["content"].strip()
            for tok in (pol, rm):
                ids = tok(tok.apply_chat_template(row["messages"], tokenize=False))["input_ids"]
                assert tok.unk_token_id not in ids, row
            prompt = pol.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
            assert len(pol(prompt)["input_ids"]) < 64  # fits --query_length 64


def test_reward_model(task):
    import torch
    from transformers import AutoModelForSequenceClassification, GPTNeoXForSequenceClassification

    rm = task.rm_tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(task.reward_model).eval()
    assert isinstance(model, GPTNeoXForSequenceClassification) and model.config.num_labels == 1
    assert model.config.pad_token_id == rm.pad_token_id
    short = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "thanks ."}]
    texts = [rm.apply_chat_template(c, tokenize=False) for c in (CONVERSATION, short)]
    batch = rm(texts, padding=True, return_tensors="pt")
    assert (batch["input_ids"] == rm.pad_token_id).any()  # the short one is right-padded
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(**rm(texts[1], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    assert torch.allclose(scores[1], alone[0], atol=1e-5)  # the score is read at the last token, not at a pad
