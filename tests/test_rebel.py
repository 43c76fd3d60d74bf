"""rebel.py: the loss against the paper, the tabular mirror-descent invariant, response processing, end to end."""

import json
import textwrap
from contextlib import nullcontext
from functools import partial

import pytest
import torch
from conftest import (
    check_end_to_end,
    check_fails_with,
    check_logged_reward_composition,
    check_ranks_in_sync,
    check_reference_is_sft,
    run_script,
)
from rl_checks import bad_input_message, run_in_process

import rebel

# ---------------------------------------------------------------------------------------------- the loss


def test_rebel_loss_hand_computed():
    logprobs = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]])
    old = torch.tensor([[-1.5, -1.0], [-2.0, -1.0]])
    rewards = torch.tensor([[1.0, 0.0], [0.2, 0.7]])
    eta = 2.0
    # pair 1: ((0.5 - (-1.0)) / 2 - 1.0)^2 = (0.75 - 1)^2 = 0.0625
    # pair 2: ((-1.0 - 0.5) / 2 - (-0.5))^2 = (-0.75 + 0.5)^2 = 0.0625
    assert rebel.rebel_loss(logprobs, old, rewards, eta).item() == pytest.approx(0.0625)
    # and with unequal terms: eta = 1 -> (1.5 - 1)^2 = 0.25, (-1.5 + 0.5)^2 = 1.0, mean 0.625
    assert rebel.rebel_loss(logprobs, old, rewards, 1.0).item() == pytest.approx(0.625)


def test_rebel_loss_zero_at_regression_target():
    torch.manual_seed(0)
    old, rewards, eta = torch.randn(5, 2), torch.randn(5, 2), 0.7
    # log pi_theta = log pi_t + eta * r + c(x): Equation (4) with any per-prompt constant.
    logprobs = old + eta * rewards + torch.randn(5, 1)
    assert rebel.rebel_loss(logprobs, old, rewards, eta).item() == pytest.approx(0.0, abs=1e-10)
    assert rebel.rebel_loss(logprobs + torch.tensor([[0.1, 0.0]]), old, rewards, eta).item() > 0


def test_official_scaling_is_eta_squared_times_paper():
    torch.manual_seed(1)
    a, b, r = torch.randn(4, 2), torch.randn(4, 2), torch.randn(4, 2)
    for eta in (0.1, 1.0, 3.0):
        paper = rebel.rebel_loss(a, b, r, eta, "paper")
        assert rebel.rebel_loss(a, b, r, eta, "official").item() == pytest.approx(eta**2 * paper.item())
        # and it is what the official code computes: ((log-ratio diff) - eta * (reward diff))^2
        lr = a - b
        official = ((lr[:, 0] - lr[:, 1]) - eta * (r[:, 0] - r[:, 1])).pow(2).mean()
        assert rebel.rebel_loss(a, b, r, eta, "official").item() == pytest.approx(official.item())


def test_exact_rebel_is_mirror_descent():
    """Section 3.2: solving Equation (1) exactly with a tabular softmax policy gives pi_t * exp(eta r) / Z."""
    torch.manual_seed(0)
    n_prompts, n_responses, eta = 3, 6, 0.8
    theta_t = torch.randn(n_prompts, n_responses)
    r = torch.randn(n_prompts, n_responses)
    old = theta_t.log_softmax(-1)
    # Every pair (y, y') for every prompt, as the regression's data (the population version of D_t).
    yi, yj = torch.meshgrid(torch.arange(n_responses), torch.arange(n_responses), indexing="ij")
    yi, yj = yi.flatten(), yj.flatten()
    theta = theta_t.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        logp = theta.log_softmax(-1)
        pair = lambda t: torch.stack((t[:, yi], t[:, yj]), -1).flatten(0, 1)  # noqa: E731  (n_prompts * K^2, 2)
        loss = rebel.rebel_loss(pair(logp), pair(old), pair(r), eta)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    mirror_descent = (old + eta * r).softmax(-1)
    torch.testing.assert_close(theta.detach().softmax(-1), mirror_descent, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- response processing


def test_truncate_after_first_eos_and_mask():
    eos, pad = 0, 1
    responses = torch.tensor([[5, 6, 0, 7, 0], [5, 6, 7, 8, 9], [0, 5, 5, 5, 5]])
    out = rebel.truncate_response(responses, [eos], pad)
    assert out.tolist() == [[5, 6, 0, 1, 1], [5, 6, 7, 8, 9], [0, 1, 1, 1, 1]]
    assert rebel.truncate_response(responses, [eos, 7], pad)[1].tolist() == [5, 6, 7, 1, 1]  # any stop token
    mask = rebel.response_mask(out, pad)
    assert mask.sum(1).tolist() == [3, 5, 1]  # EOS included; everything when there is no EOS
    assert rebel.first_true_indices(responses == eos).tolist() == [2, 5, 0]


def _load(toy):
    """The micro SFT policy as the scripts load it."""
    return rebel.load_tokenizer(toy.sft), rebel.load_policy(toy.sft, torch.float32).eval()


def _queries(tok, texts, length=20):
    tok.padding_side = "left"
    return torch.tensor(tok(texts, padding="max_length", max_length=length).input_ids)


def _sample_with_scores(model, queries, pad, n_new=8, temperature=0.7):
    """rebel.generate(), and the processed scores that generate() sampled from (a spy on model.generate)."""
    original, scores = model.generate, []

    def spy(**kwargs):
        out = original(**kwargs, output_scores=True, return_dict_in_generate=True)
        scores.extend(out.scores)
        return out.sequences

    model.generate = spy
    torch.manual_seed(0)
    sequences = rebel.generate(model, queries, rebel.sampling_config(n_new, temperature, pad))
    return sequences, torch.stack(scores, 1)


def test_logprobs_are_those_of_the_sampled_distribution(toy):
    """generate()'s processed scores (temperature applied, pad suppressed) equal our forward pass with left padding."""
    tok, model = _load(toy)
    queries = _queries(tok, ["TL;DR: my mom", "SUBREDDIT: r/pets TITLE: my dad lost my keys POST: x TL;DR:"])
    sequences, scores = _sample_with_scores(model, queries, tok.pad_token_id)
    response = sequences[:, 20:]
    assert torch.isfinite(scores[..., tok.eos_token_id]).all()  # min_new_tokens must not suppress EOS
    sampled = torch.gather(scores.log_softmax(-1), 2, response[..., None]).squeeze(-1)
    ours = rebel.response_logprobs(model, torch.cat((queries, response), 1), 20, 0.7, tok.pad_token_id)
    torch.testing.assert_close(ours, sampled, atol=1e-4, rtol=1e-4)


def test_the_pad_token_is_never_sampled(toy):
    """The micro SFT model puts mass on its pad token; a sampled pad would end the mask early while the reward model
    scored the whole response."""
    tok, model = _load(toy)
    pad = tok.pad_token_id
    queries = _queries(tok, ["TL;DR: my mom", "POST: i feel sad . TL;DR:"] * 64)
    responses = rebel.generate(model, queries, rebel.sampling_config(24, 1.0, pad))[:, 20:]
    assert not (responses == pad).any()


def test_the_checkpoints_generation_config_does_not_apply(toy, tmp_path):
    """transformers fills unset generation fields from generation_config.json; a repetition penalty there must not
    change what is sampled, or the log-probs would no longer be those of the sampled distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(toy.sft)
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.3, 2
    model.save_pretrained(tmp_path / "sft")
    tok = AutoTokenizer.from_pretrained(toy.sft)
    queries = _queries(tok, ["TL;DR: my mom", "POST: i feel sad . TL;DR:"] * 4)
    plain, penalised = (rebel.load_policy(p, torch.float32) for p in (toy.sft, str(tmp_path / "sft")))
    config = rebel.sampling_config(16, 1.0, tok.pad_token_id)
    samples = []
    for model in (plain, penalised):
        torch.manual_seed(0)
        samples.append(rebel.generate(model, queries, config))
    assert torch.equal(*samples)
    assert penalised.generation_config.repetition_penalty == 1.3  # kept for saving: only sampling sets it aside


# ---------------------------------------------------------------------------------------------- speed and memory


def test_trim_left_padding_by_hand():
    pad = 9
    queries = torch.tensor([[9, 9, 9, 9, 9, 1, 2], [9, 9, 9, 9, 3, 4, 5]])  # longest prompt: 3 tokens
    assert rebel.trim_left_padding(queries, pad, 2).tolist() == [[9, 9, 1, 2], [9, 3, 4, 5]]  # 4 columns
    assert rebel.trim_left_padding(queries, pad, 1).tolist() == [[9, 1, 2], [3, 4, 5]]
    assert rebel.trim_left_padding(queries, pad, 64).shape == (2, 7)  # never more columns than there are
    assert rebel.trim_left_padding(queries, pad, 0).shape == (2, 7)  # 0: keep the full padding


def test_padding_per_batch_leaves_logprobs_and_scores_unchanged(toy):
    """Positions count from the first real token, so dropping padding columns changes no log-prob and no score."""
    tok, model = _load(toy)
    pad = tok.pad_token_id
    queries = _queries(tok, ["TL;DR: my mom", "SUBREDDIT: r/pets TITLE: my dad POST: x TL;DR:"], length=40)
    torch.manual_seed(0)
    query_responses = rebel.generate(model, queries, rebel.sampling_config(6, 0.7, pad))
    trimmed = torch.cat((rebel.trim_left_padding(queries, pad, 8), query_responses[:, 40:]), 1)
    assert trimmed.size(1) < query_responses.size(1)
    full_lp = rebel.response_logprobs(model, query_responses, 40, 0.7, pad)
    trimmed_lp = rebel.response_logprobs(model, trimmed, trimmed.size(1) - 6, 0.7, pad)
    torch.testing.assert_close(trimmed_lp, full_lp, atol=1e-5, rtol=1e-5)
    rm = rebel.load_reward_model(toy.rm, torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(rm(trimmed, pad), rm(query_responses, pad), atol=1e-5, rtol=1e-5)


def test_trimming_responses_that_stopped_early_leaves_logprobs_and_scores_unchanged(toy):
    """The response columns that are padding in every response (all stopped before them) are dropped before the model
    passes of the rollout and of the update; the summed log-probs and the scores are those of the full width."""
    tok, model = _load(toy)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries = _queries(tok, ["TL;DR: my mom", "SUBREDDIT: r/pets TITLE: my dad POST: x TL;DR:"], length=20)
    responses = rebel.truncate_response(torch.tensor([[5, 6, eos, 7, 8, 9], [5, eos, 6, 7, 8, 9]]), [eos], pad)
    query_responses, masks = torch.cat((queries, responses), 1)[:, None], rebel.response_mask(responses, pad)[:, None]
    trimmed = rebel.trim_responses(query_responses, masks, 20)
    assert trimmed[0].shape == (2, 1, 23) and trimmed[1].shape == (2, 1, 3)  # the longest response: 2 tokens + EOS
    full = rebel.sequence_logprobs(model, query_responses, masks, 20, 0.7, pad)
    torch.testing.assert_close(rebel.sequence_logprobs(model, *trimmed, 20, 0.7, pad), full, atol=1e-5, rtol=1e-5)
    rm = rebel.load_reward_model(toy.rm, torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(rm(trimmed[0][:, 0], pad), rm(query_responses[:, 0], pad), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 1e-4])  # sampled, and near greedy
def test_the_static_cache_samples_the_same_tokens(toy, temperature):
    tok, model = _load(toy)
    pad = tok.pad_token_id
    queries = _queries(tok, ["TL;DR: my mom", "SUBREDDIT: r/pets TITLE: my dad lost my keys POST: x TL;DR:"])
    samples = []
    for static in (False, True):
        torch.manual_seed(3)
        samples.append(rebel.generate(model, queries, rebel.sampling_config(12, temperature, pad, static)))
    assert torch.equal(samples[0], samples[1])


def test_gradient_checkpointing_gives_the_same_gradients(toy):
    """Recomputed activations give the gradients of stored ones, under LoRA (the frozen base needs no input grads)."""
    from peft import LoraConfig, get_peft_model

    tok, _ = _load(toy)
    pad = tok.pad_token_id
    queries = _queries(tok, ["TL;DR: my mom", "SUBREDDIT: r/pets TITLE: my dad POST: x TL;DR:"])
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(rebel.load_policy(toy.sft, torch.float32), LoraConfig(r=4, init_lora_weights=False))
        model.eval()
        if checkpointed:
            rebel.checkpoint_layers(model)
            assert sum(isinstance(m.forward, partial) for m in model.modules()) == 2  # the micro model's two layers
        rebel.response_logprobs(model, queries, 10, 1.0, pad).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_masked_logprob_sum_equals_naive_per_sequence(toy):
    tok, model = _load(toy)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    q1, q2 = tok("TL;DR: my mom").input_ids, tok("POST: i feel sad . TL;DR:").input_ids
    r1, r2 = [5, 6, eos, 7], [8, 9, 10, 11]  # the first stops at EOS, the second has none
    L = max(len(q1), len(q2))
    queries = torch.tensor([[pad] * (L - len(q1)) + q1, [pad] * (L - len(q2)) + q2])
    responses = rebel.truncate_response(torch.tensor([r1, r2]), [eos], pad)
    query_responses, masks = torch.cat((queries, responses), 1)[:, None], rebel.response_mask(responses, pad)[:, None]
    batch = rebel.sequence_logprobs(model, query_responses, masks, L, 0.7, pad)[:, 0]
    for i, (q, r) in enumerate(((q1, r1[:3]), (q2, r2))):  # no padding at all, one sequence at a time
        logits = model(torch.tensor([q + r])).logits[0, len(q) - 1 : -1] / 0.7
        logits[:, pad] = float("-inf")  # the distribution sampled from never holds the pad token
        naive = sum(logits[t].log_softmax(-1)[tok_id].item() for t, tok_id in enumerate(r))
        assert batch[i].item() == pytest.approx(naive, abs=1e-4)


def test_a_pad_id_of_zero_gives_finite_logprobs(toy):
    """Llama-2 setups often pad with <unk> = 0: the pad logit is excluded, and pad positions must read 0, not -inf
    (which the mask would turn into NaN)."""
    _, model = _load(toy)
    query_responses = torch.tensor([[[7, 8, 9, 5, 6, 0, 0]]])  # one prompt, one response of two tokens, pad id 0
    masks = torch.tensor([[[True, True, False, False]]])
    logprobs = rebel.response_logprobs(model, query_responses[0], 3, 1.0, 0)
    assert logprobs[0, 2:].tolist() == [0.0, 0.0] and torch.isfinite(logprobs).all()
    assert torch.isfinite(rebel.sequence_logprobs(model, query_responses, masks, 3, 1.0, 0)).all()


def test_reward_read_at_last_token_with_left_padding(toy):
    tok, _ = _load(toy)
    rm = rebel.load_reward_model(toy.rm, torch.float32).eval()
    pad = tok.pad_token_id
    seq = tok("TL;DR: my mom lost my keys .").input_ids + [tok.eos_token_id]
    alone = rm(torch.tensor([seq]), pad)
    padded = rm(torch.tensor([[pad] * 5 + seq + [pad] * 3]), pad)  # left-padded query, right-padded response
    assert padded.item() == pytest.approx(alone.item(), abs=1e-5)
    # and the score is the head applied to the hidden state of the last real token (the EOS)
    hidden = rm.backbone(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]
    assert rm.bias != 0  # reward.py normalised it
    assert alone.item() == pytest.approx(rm.head(hidden).item() - rm.bias, abs=1e-5)


def test_scalar_head_checkpoint_format(toy, tmp_path):
    """summarize_from_feedback_details' reward models: config with base_config, lm_backbone.* and scalar_head.*."""
    from safetensors.torch import save_file

    rm = rebel.load_reward_model(toy.rm, torch.float32)
    state = {f"lm_backbone.{k}": v.contiguous() for k, v in rm.backbone.state_dict().items()}
    state.update({f"scalar_head.{k}": v.contiguous() for k, v in rm.head.state_dict().items()})
    save_file(state, str(tmp_path / "model.safetensors"))
    config = {"base_config": rm.backbone.config.to_dict(), "hidden_size": rm.backbone.config.hidden_size, "bias": 0.25}
    (tmp_path / "config.json").write_text(json.dumps(config))
    other = rebel.load_reward_model(str(tmp_path), torch.float32)
    x = torch.tensor([[3, 4, 5, 0]])
    assert other(x, 1).item() == pytest.approx(rm(x, 1).item() + rm.bias - 0.25, abs=1e-5)


def test_rollout_pairs_masks_and_eos(toy, monkeypatch):
    tok, model = _load(toy)
    rm = rebel.load_reward_model(toy.rm, torch.float32).eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    queries, prompts = torch.tensor([[pad, 5, 6], [7, 8, 9]]), ["a", "b"]
    fixed = torch.tensor([[5, eos, 9, 9], [5, 6, 7, 8], [eos, 3, 3, 3], [4, 4, 4, 4]])  # pairs: (0, 1), (2, 3)
    monkeypatch.setattr(rebel, "generate", lambda m, q, c: torch.cat((q, fixed[: q.size(0)]), 1))
    config = rebel.sampling_config(4, 1.0, pad)
    responses = rebel.sample_responses(model, queries, 2, config, chunk=8)  # (2, 2, 4): the fixed tokens
    assert responses.tolist() == fixed.view(2, 2, 4).tolist()
    query_responses, masks, logprobs, ref_logprobs, scores, has_eos = rebel.score_responses(
        policy=model, ref_policy=lambda: nullcontext(model), reward=rebel.Reward(tok, rm), queries=queries,
        responses=responses, prompts=prompts, config=config, stop_ids=[eos], penalty=-7.0, chunk=1,
    )  # fmt: skip
    assert query_responses.shape == (2, 2, 7) and query_responses[0, 0].tolist() == [pad, 5, 6, 5, eos, pad, pad]
    assert has_eos.tolist() == [[True, False], [True, False]]
    assert masks.sum(-1).tolist() == [[2, 4], [1, 4]]
    torch.testing.assert_close(logprobs, ref_logprobs)  # the same model as its own reference
    assert scores[0, 0].item() == pytest.approx(rm(query_responses[0, :1], pad).item(), abs=1e-5)
    assert scores[:, 1].tolist() == [-7.0, -7.0]  # no stop token: the penalty, the score Equation (1) regresses on


def test_the_docstrings_one_update_sketch_runs(toy):
    """rebel.py's docstring sketches one update with the core functions (sampling, scoring, rewards, Equation 1's
    steps). Run as written on the micro policy with a LoRA adapter: the rollout has Algorithm 1's shapes, and the steps
    move the adapter (pi_theta leaves pi_t, the reference stays). A renamed argument or a wrong call fails here."""
    from peft import LoraConfig, get_peft_model

    doc = rebel.__doc__
    sketch = doc[doc.index("    ref_policy = partial(") : doc.index("To copy the core")]
    tokenizer, model = _load(toy)
    policy = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], init_lora_weights=False)
    )
    x = _queries(tokenizer, ["a post about a cat", "another post"])
    rm = rebel.load_reward_model(toy.rm, torch.float32).eval()
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    names = {n: getattr(rebel, n) for n in dir(rebel) if not n.startswith("__")}
    names |= dict(tokenizer=tokenizer, policy=policy, x=x, prompts=["a post about a cat", "another post"],
                  reward=rebel.Reward(tokenizer, rm), temperature=0.7, kl_coef=0.05, eta=1.0, noptepochs=2,
                  optimizer=torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2))  # fmt: skip
    torch.manual_seed(0)
    exec(textwrap.dedent(sketch), names)
    r = names["rollout"]
    assert r.query_responses.shape == (2, 2, x.size(1) + 53) and names["rewards"].shape == (2, 2)
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "the sketch's optimizer steps left the adapter where it was"


# ---------------------------------------------------------------------------------------------- end to end


def test_one_large_step_raises_the_better_response_of_every_pair(toy, tmp_path):
    """One update at a large learning rate, rewarded by a deterministic --reward_fn (a response's word count; the
    no-EOS penalty without EOS) and no KL term: each pair's rewards are those of its own responses, and in every pair
    whose rewards differ the better response gains log-probability on the other, ln pi_1(y)/pi_0(y) -
    ln pi_1(y')/pi_0(y') has the sign of r(y) - r(y') (Equation 1 regresses the one onto the other)."""
    (tmp_path / "words.py").write_text(
        "def words(prompts, responses):\n    return [len(r.split()) for r in responses]\n"
    )
    i = toy.rl_flags.index("--reward_model_path")
    flags = [*toy.rl_flags[:i], *toy.rl_flags[i + 2 :], "--reward_fn", f"{tmp_path / 'words.py'}:words", "--lr", "1e-2",
             "--kl_coef", "0", "--total_episodes", "8", "--num_eval_prompts", "1", "--output_dir", "",
             "--run_dir", str(tmp_path / "run")]  # fmt: skip
    g = run_in_process("rebel.py", flags)
    tok, qr, masks, ctx = g["tokenizer"], g["pair_query_responses"], g["pair_masks"], g["ctx"]
    texts = tok.batch_decode(qr[..., ctx:].flatten(0, 1), skip_special_tokens=True)
    ended = (qr[..., ctx:] == tok.eos_token_id).any(-1).flatten()
    expected = torch.where(ended, torch.tensor([float(len(t.split())) for t in texts]), -1.0).view(-1, 2)
    torch.testing.assert_close(g["pair_rewards"], expected)  # (B, 2): y's reward first, y''s second
    with torch.no_grad():
        new = rebel.sequence_logprobs(g["raw_policy"], qr, masks, ctx, g["args"].temperature, g["pad"])  # pi_1
    gain = (new - g["pair_logprobs"]) @ torch.tensor([1.0, -1.0])  # (B,)
    target = expected @ torch.tensor([1.0, -1.0])
    differ = target != 0
    assert differ.sum() >= 2, "too few pairs with different rewards to check"
    assert (gain.sign() == target.sign())[differ].all(), (gain, target)


def test_rebel_end_to_end_saves_a_loadable_model(toy, tmp_path):
    import pandas as pd
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    keys = ("time/generation", "time/reward", "time/logprob", "objective/kl")
    rows = check_end_to_end("rebel.py", [*toy.rl_flags, "--save_merged", "--gradient_checkpointing"], tmp_path, keys)
    check_logged_reward_composition(rows, kl_coef=0.05)
    check_reference_is_sft(tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / "eval_000002.csv", keep_default_na=False)
    columns = ["query", "postprocessed_response", "score", "kl", "response_length", "has_eos", "reference_response"]
    assert list(table.columns) == [*columns, "reference_score"] and len(table) == 8
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "merged"))
    # Under activation checkpointing the adapter is saved whole, with the model's own names.
    from safetensors.torch import load_file

    adapter, merged = (
        load_file(tmp_path / "out" / f) for f in ("adapter_model.safetensors", "merged/model.safetensors")
    )
    assert len([k for k in adapter if "lora_A" in k]) == 2  # one per layer of the micro model
    assert not [k for k in [*adapter, *merged] if "checkpoint" in k]


def test_full_finetuning_and_official_scaling(toy, tmp_path):
    run_script("rebel.py", *toy.rl_flags, "--no-lora", "--loss_scaling", "official", "--eta", "0.5",
               "--output_dir", str(tmp_path / "policy"), "--run_dir", str(tmp_path / "run"))  # fmt: skip
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"))


def test_help():
    proc = run_script("rebel.py", "--help")
    assert "--eta" in proc.stdout and "--kl_coef" in proc.stdout and "Equation (1)" in proc.stdout


def test_torchrun_two_ranks_stay_in_sync(toy, tmp_path):
    check_ranks_in_sync("rebel.py", toy.rl_flags, tmp_path / "run")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--eta", "0"], "--eta must be > 0"),
        (["--batch_size", "6"], "not divisible"),
        (["--query_column", "post"], "has no column 'post'"),
        (["--reward_model_path", "/nonexistent/rm"], "--reward_model_path /nonexistent/rm: no such file or directory"),
        (["--total_episodes", "4"], "smaller than one --batch_size"),
    ],
)
def test_bad_input_gives_a_clear_error(toy, tmp_path, flags, message):
    assert message in bad_input_message("rebel.py", [*toy.rl_flags, *flags, "--run_dir", str(tmp_path / "run")])


def test_unreadable_reward_checkpoint(toy, tmp_path):
    import shutil

    shutil.copytree(toy.rm, tmp_path / "rm")
    (tmp_path / "rm" / "model.safetensors").write_bytes(b"not a checkpoint")
    flags = list(toy.rl_flags)
    flags[flags.index("--reward_model_path") + 1] = str(tmp_path / "rm")
    check_fails_with("rebel.py", flags, "reward model: cannot read the checkpoint", tmp_path / "run")


def test_tokenizer_with_pad_equal_to_eos_runs(toy, tmp_path):
    """Llama-3 and Mistral ship pad == EOS: the script adds its own pad token in memory, and the run is unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy.sft)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "sft")
    AutoModelForCausalLM.from_pretrained(toy.sft).save_pretrained(tmp_path / "sft")
    loaded = rebel.load_tokenizer(str(tmp_path / "sft"))
    assert loaded.pad_token_id not in (loaded.eos_token_id, None)
    flags = list(toy.rl_flags)
    flags[flags.index("--sft_model_path") + 1] = str(tmp_path / "sft")
    run_script("rebel.py", *flags, "--output_dir", "", "--run_dir", str(tmp_path / "run"))
