"""The log-prob pass (response_logprobs): the LM head reads the response positions only, and the values and gradients
are those of the plain formula (full logits, fp32 copy, log-softmax, gather) in fp32 and in bf16."""

import pytest
import torch

import rebel


def tiny_llama(vocab: int = 300, dtype=torch.float32, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def plain_logprobs(model, query_responses, context_length, temperature, pad_id):
    """The formula before the LM head was limited to the response: every position's logits, a full fp32 copy."""
    logits = rebel.forward(model, query_responses, pad_id).logits[:, context_length - 1 : -1].float() / temperature
    if pad_id < logits.size(-1):
        logits[..., pad_id] = float("-inf")
    responses = query_responses[:, context_length:]
    is_pad = responses == pad_id
    logprobs = logits.log_softmax(-1).gather(2, responses.masked_fill(is_pad, 0).unsqueeze(-1)).squeeze(-1)
    return logprobs.masked_fill(is_pad, 0.0)


def batch(pad_id: int, vocab: int = 300, width: int = 9):
    """Two left-padded prompts of 12 columns, then responses of `width` columns, one right-padded after 5 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(1, vocab - 1, (2, 12 + width))
    ids[0, :4] = pad_id  # left padding of the first prompt
    ids[1, 12 + 5 :] = pad_id  # the second response stopped
    return ids


# pad 0: inside the vocabulary (Llama-2's unk); pad 300: an added token past it. The 128k vocabulary makes several
# chunks (about 2**24 logits each) of the 80 response positions.
CASES = [(torch.float32, 0, 300, 9), (torch.float32, 300, 300, 9), (torch.bfloat16, 0, 300, 9),
         (torch.bfloat16, 300, 300, 9), (torch.float32, 0, 128256, 80)]  # fmt: skip


@pytest.mark.parametrize("dtype, pad_id, vocab, width", CASES)
def test_logprobs_and_gradients_match_the_plain_formula(dtype, pad_id, vocab, width):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    model = tiny_llama(vocab, dtype, hidden=32 if vocab == 300 else 8)
    query_responses = batch(pad_id, vocab, width)
    ours = rebel.response_logprobs(model, query_responses, 12, 0.7, pad_id)
    ours.sum().backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = plain_logprobs(model, query_responses, 12, 0.7, pad_id)
    plain.sum().backward()
    torch.testing.assert_close(ours, plain, atol=tol, rtol=tol)
    assert ours[1, 5:].eq(0).all() and torch.isfinite(ours).all()
    for mine, theirs in zip(ours_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(mine, theirs, atol=tol, rtol=tol)


@pytest.mark.parametrize("wrap", ["none", "lora"])
def test_the_lm_head_reads_the_response_positions_only(wrap):
    """The full-vocabulary logits of the prompt are never computed, also through a peft wrapper."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    head = model.get_output_embeddings()
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    positions = []
    head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    query_responses = batch(0)
    rebel.sequence_logprobs(model, query_responses[:, None], torch.ones(2, 1, 9), 12, 1.0, 0).sum().backward()
    assert positions == [9]  # the response's 9 positions


def test_a_model_that_ignores_logits_to_keep_gets_the_same_logprobs():
    """A causal LM whose forward takes the flag in **kwargs and computes every position (transformers' xLSTM)."""

    class IgnoresTheFlag(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, logits_to_keep=None, **kwargs):
            return self.model(**kwargs)

    model = tiny_llama()
    query_responses = batch(0)
    ours = rebel.response_logprobs(IgnoresTheFlag(model), query_responses, 12, 0.7, 0)
    torch.testing.assert_close(ours, plain_logprobs(model, query_responses, 12, 0.7, 0))


def test_the_sft_loss_reads_the_response_positions_only():
    """sft.py's cross-entropy: the value over the response tokens as before, with the LM head on those positions."""
    import sft

    model = tiny_llama()
    positions = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    query_responses = batch(300)
    loss = sft.sft_loss(model, query_responses, 12, 300)
    assert positions == [9]
    logits = rebel.forward(model, query_responses, 300).logits[:, 11:-1]
    labels = query_responses[:, 12:].masked_fill(query_responses[:, 12:] == 300, -100)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))
