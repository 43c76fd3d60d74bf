"""Checks shared by the tests of the online scripts built on rebel.py's skeleton (rloo.py, iterative_dpo.py): run a
script in this process and inspect the last update's tensors, the local variables of its main() when it returns."""

import os
import runpy
import signal
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_process(script: str, flags: list[str]) -> dict:
    """Run `python script flags` here and return the local variables of the script's main() as it returned (the last
    update's rollout among them), caught by a profile hook on main's return."""
    saved = sys.argv, sys.excepthook, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sys.argv, path, captured = [os.path.join(ROOT, script), *flags], os.path.join(ROOT, script), {}

    def on_return(frame, event, arg):
        if event == "return" and frame.f_code.co_name == "main" and frame.f_code.co_filename == path:
            captured.update(frame.f_locals)

    try:
        with torch.random.fork_rng():
            sys.setprofile(on_return)
            try:
                module_globals = runpy.run_path(sys.argv[0], run_name="__main__")
            finally:
                sys.setprofile(None)
        return captured or module_globals  # a script whose loop is not in a main() leaves its globals
    finally:
        sys.argv, sys.excepthook = saved[:2]
        signal.signal(signal.SIGINT, saved[2])  # the script's stop handlers
        signal.signal(signal.SIGTERM, saved[3])


def bad_input_message(script: str, flags: list[str]) -> str:
    """Run the script here and return the message of the BadInput it raises (the script prints it as one line)."""
    try:
        run_in_process(script, flags)
    except Exception as e:
        assert type(e).__name__ == "BadInput", f"{script} raised {type(e).__name__}: {e}"
        return str(e)
    raise AssertionError(f"{script} {flags} ran to the end")


def sequence_logprob(model, query_response: torch.Tensor, query_length: int, pad_id: int, temperature: float):
    """log pi(y|x) of one (query, response) row the naive way: pads stripped, no attention mask, no batching."""
    query, response = query_response[:query_length], query_response[query_length:]
    query, response = query[query != pad_id], response[response != pad_id]
    with torch.no_grad():
        logits = model(torch.cat((query, response))[None]).logits[0, len(query) - 1 : -1].float() / temperature
    if pad_id < logits.size(-1):
        logits[:, pad_id] = float("-inf")  # the pad token is never sampled
    return logits.log_softmax(-1).gather(1, response[:, None]).sum().item()


def logprobs_under(model, g: dict) -> torch.Tensor:
    """(B, n) log-probs of the last update's responses under `model`, computed independently of the script."""
    qr, args = g["query_responses"], g["args"]
    ctx = qr.size(-1) - args.response_length  # the batch's prompts are padded to their longest, not to query_length
    flat = [sequence_logprob(model, row, ctx, g["pad"], args.temperature) for row in qr.flatten(0, 1)]
    return torch.tensor(flat, dtype=torch.float32).view(qr.shape[:2])


def check_reward_composition(g: dict) -> None:
    """r(x, y) = RM score (or the no-EOS penalty) - kl_coef * (ln pi_t(y|x) - ln pi_SFT(y|x)), with that sign."""
    args, qr, pad, eos = g["args"], g["query_responses"], g["pad"], g["tokenizer"].eos_token_id
    kl = g["logprobs"] - g["ref_logprobs"]  # (B, n)
    assert kl.abs().max() > 0.05, "pi_t still equals the reference: this run cannot tell the KL's sign"
    with torch.no_grad():
        raw_scores = g["reward"].model(qr.flatten(0, 1), pad).float().view(qr.shape[:2])
    has_eos = (qr[..., qr.size(-1) - args.response_length :] == eos).any(-1)
    expected = torch.where(has_eos, raw_scores, args.penalty_reward_value) - args.kl_coef * kl
    torch.testing.assert_close(g["rewards"], expected, atol=1e-4, rtol=1e-4)
    # The penalty pushes the reward below the score wherever pi_t is more likely than the reference, and above it
    # where it is less likely.
    scores = torch.where(has_eos, raw_scores, args.penalty_reward_value)
    assert ((g["rewards"] - scores) * kl <= 1e-6).all()


def check_reference_logprobs_are_sft(g: dict, sft_path: str) -> None:
    """The KL reference's log-probs are those of the SFT checkpoint loaded on its own; the trained policy's are not."""
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(sft_path).eval()
    ref_logprobs, sft_logprobs = g["ref_logprobs"], logprobs_under(sft, g)
    torch.testing.assert_close(ref_logprobs, sft_logprobs, atol=2e-3, rtol=1e-4)
    trained_logprobs = logprobs_under(g["raw_policy"].eval(), g)
    assert (trained_logprobs - ref_logprobs).abs().max() > 0.05, "training did not move the policy off the reference"
