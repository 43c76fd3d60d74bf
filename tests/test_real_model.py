"""A real pretrained chat model, SmolLM2-135M-Instruct (tests/real_model.py): its BPE tokenizer, ChatML template and
end of turn (<|im_end|>), where the other tests have toy models with tokenizers trained on the spot."""

import os
import threading
import time

import pytest
import real_model


def test_two_conversions_at_once_leave_one_whole_folder(tmp_path, monkeypatch):
    """Two test processes starting on an empty cache both convert; each writes its own folder and renames it into
    place, so the cache ends with one complete model, no half-written one and no leftovers, and neither fails."""

    def slow_convert(gguf, out):
        open(os.path.join(out, "config.json"), "w").write("{}")
        time.sleep(0.3)  # both are converting now
        open(os.path.join(out, "model.safetensors"), "w").write(gguf)

    monkeypatch.setattr(real_model, "convert", slow_convert)
    out, errors = str(tmp_path / "cache" / "model"), []

    def convert():
        try:
            real_model.convert_once("weights", out)
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.listdir(tmp_path / "cache") == ["model"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_the_converted_model_answers_through_its_chat_template(smollm2):
    """The folder loads as any checkpoint; the tokenizer carries SmolLM2's ChatML template, and a greedy answer through
    it is SmolLM2's and ends at the template's end of turn, <|im_end|> (its EOS, also in the generation config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2)
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    query = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(query["input_ids"][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    answer = model.generate(**query, max_new_tokens=24, do_sample=False)[0, query["input_ids"].size(1) :]
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|im_end|>"
