"""Every algorithm script on what users bring, built from configs (nothing downloaded), all at once:
a Llama-architecture policy whose embedding has exactly len(tokenizer) rows and whose tokenizer has pad == EOS, given
as a LoRA adapter (the SFT checkpoint), whose generation_config.json sets a repetition penalty; a reward model of
another width in summarize_from_feedback_details' format with a bias-less head; prompts in a single JSONL file.
Each script must run in bf16 (CPU autocast), start at the SFT policy (KL 0 before the first update), and save an
output that loads as the trained policy, without an embedding resized to the tokenizer's added pad token."""

import json
import os

import pandas as pd
import pytest
import torch
from conftest import run_script
from eval_helpers import tiny_llama_config
from peft import PeftModel

import rebel

X = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])  # a few token ids to compare models on

SCRIPTS = {
    "rebel.py": [],
    "ppo.py": [],
    "rloo.py": ["--rloo_k", "2"],
    "iterative_dpo.py": [],
    "dpo.py": ["--preference_dataset"],  # completed in the test with the pairs
}


def llama(vocab: int, hidden: int):
    return tiny_llama_config(vocab, hidden, layers=1, bos_token_id=0, eos_token_id=0, pad_token_id=0)


@pytest.fixture(scope="module")
def user(toy, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer, LlamaForCausalLM

    d = tmp_path_factory.mktemp("user")
    tok = AutoTokenizer.from_pretrained(toy.sft)
    tok.pad_token = tok.eos_token  # as Llama-3 and Mistral ship
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama(len(tok), 32))
    assert base.get_input_embeddings().num_embeddings == len(tok)
    base.generation_config.repetition_penalty = 1.3
    base.save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    base = LlamaForCausalLM.from_pretrained(d / "base")  # so that the adapter records where its base is
    adapter = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))  # a non-zero adapter
    adapter.save_pretrained(d / "sft")
    tok.save_pretrained(d / "sft")
    backbone = AutoModel.from_config(llama(len(tok), 48))  # another width than the policy
    state = {f"lm_backbone.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    state["scalar_head.weight"] = torch.randn(1, 48) * 0.1  # no bias
    os.makedirs(d / "rm")
    save_file(state, str(d / "rm" / "model.safetensors"))
    config = {"base_config": backbone.config.to_dict(), "hidden_size": 48}
    (d / "rm" / "config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_on_user_shaped_inputs(toy, user, tmp_path, script):
    flags = list(toy.rl_flags)
    for name, value in (("--sft_model_path", user / "sft"), ("--reward_model_path", user / "rm"),
                        ("--query_dataset", os.path.join(toy.tldr, "train.jsonl"))):  # fmt: skip
        flags[flags.index(name) + 1] = str(value)
    extra = [*SCRIPTS[script], toy.preference] if script == "dpo.py" else SCRIPTS[script]
    out, run = tmp_path / "out", tmp_path / "run"
    run_script(script, *flags, *extra, "--precision", "bf16", "--output_dir", str(out), "--run_dir", str(run))
    first = pd.read_csv(run / "eval_000000.csv")
    assert first.kl.abs().max() < 1e-4  # the policy starts at the SFT policy, the adapter merged
    # the new adapter sits on the merged SFT adapter, so that loading it rebuilds the trained policy (not base + it)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(user / "sft")
    policy = rebel.load_policy(str(out), torch.float32)
    assert policy.get_input_embeddings().num_embeddings == len(rebel.load_tokenizer(str(user / "base"))) - 1
    by_hand = PeftModel.from_pretrained(sft_by_hand(user).merge_and_unload(), out).merge_and_unload()
    torch.testing.assert_close(policy(X).logits, by_hand(X).logits, atol=1e-5, rtol=1e-5)


def sft_by_hand(user):
    """The SFT policy as peft builds it: the base with the adapter attached, not merged."""
    from transformers import LlamaForCausalLM

    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(user / "base"), user / "sft").eval()


def test_an_adapter_given_as_the_sft_model_is_that_model(user):
    """The scripts' policy and reference start from load_policy(--sft_model_path): base + adapter, not the base."""
    from transformers import LlamaForCausalLM

    ours = rebel.load_policy(str(user / "sft"), torch.float32).eval()
    torch.testing.assert_close(ours(X).logits, sft_by_hand(user)(X).logits, atol=1e-5, rtol=1e-5)
    base = LlamaForCausalLM.from_pretrained(user / "base")
    assert (ours(X).logits - base(X).logits).abs().max() > 1e-3
