"""Retention evaluation on real megatron-core GPTModels (tiny, CPU): batched = naive, hand-computed metrics, TP2 = TP1.

The controlled model: with the final layer norm's weight at zero and its bias a unit vector e_0, the hidden state
before the (tied) output layer is e_0 at every position, so the logits are column 0 of the embedding whatever the
context. Setting that column to chosen values u gives log p(t) = u_t - logsumexp(u) everywhere: every score,
multiple-choice outcome and greedy match of a hand-built probe set can be computed by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_two_tasks
from kislurm.plan.presets import BUILTIN_PRESETS
from kislurm.train.distributed import init_model_parallel, seed_all, teardown
from kislurm.retention.evaluate import (
                                        EvalError,
                                        EvalResult,
                                        evaluate_retention,
                                        retention_metrics,
                                        score_candidates,
                                        score_candidates_naive,
                                        strictly_best,
                                        )
from kislurm.data.knowledge import ProbeSet
from kislurm.train.model import build_model

PRESET = BUILTIN_PRESETS["cpu-s"]  # 2 layers, hidden 32, 4 heads, seq 32
VOCAB = 200
SEED = 1234


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and builders


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    ctx = init_model_parallel(1)
    seed_all(SEED)
    gpt = build_model(PRESET, VOCAB, 0.02, "fp32")
    yield gpt
    teardown(ctx)


@pytest.fixture(scope="module")
def probes(model) -> ProbeSet:
    return random_probes(model, np.random.default_rng(0), n_facts=12, n_probes=30, n_choices=4)


def next_logits(model, prompt: np.ndarray) -> torch.Tensor:
    """Full-vocabulary next-token logits after `prompt` (TP=1 model)."""
    tokens = torch.as_tensor(prompt, dtype=torch.int64)
    length = len(tokens)
    mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        return model(input_ids=tokens[None], position_ids=torch.arange(length)[None], attention_mask=mask,
                     runtime_gather_output=True)[0, -1]


def greedy_continuation(model, prompt: np.ndarray, n: int) -> np.ndarray:
    """n tokens of greedy decoding after `prompt` (the reference for exact match)."""
    tokens = np.asarray(prompt, dtype=np.int32)
    for _ in range(n):
        tokens = np.append(tokens, np.int32(next_logits(model, tokens).argmax()))
    return tokens[len(prompt):]


def best_in_other_half(model, prompt: np.ndarray) -> np.ndarray:
    """The most likely next token among the half of the (padded) vocabulary that does not hold the greedy token:
    the argmax of one TP=2 shard but not of the whole vocabulary, a trap for a shard-local argmax."""
    logits = next_logits(model, prompt)
    half = len(logits) // 2
    other = slice(half, None) if int(logits.argmax()) < half else slice(0, half)
    return np.array([int(logits[other].argmax()) + other.start], dtype=np.int32)


def random_probes(model, rng: np.random.Generator, n_facts: int, n_probes: int, n_choices: int) -> ProbeSet:
    """Random prompts (1-12 tokens) and candidates (1-4 tokens). Probe p's answer is the model's greedy
    continuation when p % 3 == 0 (exact match true), the best token of the other vocabulary half when p % 3 == 1
    (exact match false, true for a shard-local argmax), random otherwise (false)."""
    model.eval()
    prompts, cands = [], []
    answer = rng.integers(0, n_choices, n_probes)
    for p in range(n_probes):
        prompt = rng.integers(0, VOCAB, rng.integers(1, 13)).astype(np.int32)
        row = [rng.integers(0, VOCAB, rng.integers(1, 5)).astype(np.int32) for _ in range(n_choices)]
        if p % 3 == 0:
            row[answer[p]] = greedy_continuation(model, prompt, int(rng.integers(1, 4)))
        elif p % 3 == 1:
            row[answer[p]] = best_in_other_half(model, prompt)
        prompts.append(prompt)
        cands.append(row)
    model.train()
    return ProbeSet(
        fact_ids=[f"{'general' if f < n_facts // 2 else 'knowledge'}:{f}:rel" for f in range(n_facts)],
        fact_group=np.array([0 if f < n_facts // 2 else 1 for f in range(n_facts)], dtype=np.int8),
        fact_index=rng.integers(0, n_facts, n_probes).astype(np.int64),
        heldout=rng.random(n_probes) < 0.4,
        prompt=prompts,
        candidates=cands,
        answer=answer.astype(np.int64),
        n_choices=n_choices,
    )


def controlled_model(u: np.ndarray):
    """A fresh model whose next-token logits are `u` (length VOCAB; padded rows -30) at every position."""
    ctl = build_model(PRESET, VOCAB, 0.02, "fp32")
    with torch.no_grad():
        norm = ctl.decoder.final_layernorm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        emb = ctl.embedding.word_embeddings.weight
        emb[:, 0] = -30.0  # padded vocabulary rows: negligible probability
        emb[: len(u), 0] = torch.as_tensor(u, dtype=emb.dtype)
    return ctl


def subset(probes: ProbeSet, order: np.ndarray) -> ProbeSet:
    """The probes in `order` (a permutation or a selection), same facts."""
    return ProbeSet(
        fact_ids=probes.fact_ids, fact_group=probes.fact_group, fact_index=probes.fact_index[order],
        heldout=probes.heldout[order], prompt=[probes.prompt[i] for i in order],
        candidates=[probes.candidates[i] for i in order], answer=probes.answer[order], n_choices=probes.n_choices,
    )


# ----------------------------------------------------------------------------------------------------------------
# Batched scoring against the naive loop


def test_batched_scores_equal_naive_loop(model, probes):
    ref_scores, ref_exact = score_candidates_naive(model, probes)
    for project_scored_only in (True, False):
        scores, exact = score_candidates(model, probes, batch_size=16, project_scored_only=project_scored_only)
        assert scores.shape == (30, 4) and exact.shape == (30,)
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(exact, ref_exact)
    np.testing.assert_array_equal(exact, np.arange(30) % 3 == 0)  # only greedy continuations match
    assert np.isfinite(scores).all() and (scores < 0).all()


def test_evaluate_retention_consistent_with_naive(model, probes):
    result = evaluate_retention(model, probes, batch_size=7)
    ref_scores, ref_exact = score_candidates_naive(model, probes)
    assert isinstance(result, EvalResult)
    np.testing.assert_array_equal(result.probe_correct, strictly_best(ref_scores, probes.answer))
    np.testing.assert_array_equal(result.probe_exact, ref_exact)
    expected = retention_metrics(probes, result.probe_correct, result.probe_exact)
    for name, value in expected.items():
        assert result.metrics[name] == pytest.approx(value, nan_ok=True)


def test_padding_batch_size_and_order_do_not_change_scores(model, probes):
    one_batch, _ = score_candidates(model, probes, batch_size=10_000)  # everything padded to the longest
    no_padding, _ = score_candidates(model, probes, batch_size=1)
    odd, _ = score_candidates(model, probes, batch_size=5)
    np.testing.assert_allclose(one_batch, no_padding, rtol=0, atol=1e-5)
    np.testing.assert_allclose(odd, no_padding, rtol=0, atol=1e-5)
    perm = np.random.default_rng(1).permutation(30)
    permuted, _ = score_candidates(model, subset(probes, perm), batch_size=8)
    np.testing.assert_allclose(permuted, no_padding[perm], rtol=0, atol=1e-5)


def test_model_mode_restored_and_no_grad(model, probes):
    model.train()
    evaluate_retention(model, subset(probes, np.arange(3)), batch_size=4)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    evaluate_retention(model, subset(probes, np.arange(3)), batch_size=4, exact_match=False)
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed metrics on a controlled model


def hand_probes() -> ProbeSet:
    """Five probes whose outcomes under logits u (token 5: 3, tokens 6 and 7: 2, others 0) are known."""
    c = lambda *ids: np.array(ids, dtype=np.int32)  # noqa: E731
    return ProbeSet(
        fact_ids=["general:0:city", "knowledge:0:a", "knowledge:1:b"],
        fact_group=np.array([0, 1, 1], dtype=np.int8),
        fact_index=np.array([0, 0, 1, 2, 2], dtype=np.int64),
        heldout=np.array([False, True, False, True, False]),
        prompt=[c(1, 2, 3), c(4), c(10, 11, 12, 13, 14, 15, 16), c(3, 3), c(9)],
        candidates=[
            [c(5), c(6), c(8)],  # answer [5]: best score and the greedy token: correct, exact
            [c(6), c(7), c(8)],  # answer [6] ties [7]: wrong (ties fail), not exact
            [c(5, 5), c(5), c(6)],  # answer [5, 5] loses to [5] (two tokens cost more), yet greedy: wrong, exact
            [c(8), c(9, 9), c(6)],  # answer [6] beats [8] and [9, 9]: correct, not exact (greedy says 5)
            [c(7), c(5), c(8)],  # answer [5]: correct, exact
        ],
        answer=np.array([0, 0, 0, 2, 1], dtype=np.int64),
        n_choices=3,
    )


def test_metrics_on_controlled_model_match_hand_computation(model):
    u = np.zeros(VOCAB)
    u[5], u[6], u[7] = 3.0, 2.0, 2.0
    ctl = controlled_model(u)
    probes = hand_probes()
    result = evaluate_retention(ctl, probes, batch_size=4)

    padded = np.full(256, -30.0)  # build_model pads the vocabulary to a multiple of 128
    padded[:VOCAB] = u
    lse = math.log(np.exp(padded).sum())
    expected_scores = [[sum(u[t] - lse for t in cand) for cand in row] for row in probes.candidates]
    np.testing.assert_allclose(result.scores, expected_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.probe_correct, [True, False, False, True, True])
    np.testing.assert_array_equal(result.probe_exact, [True, False, True, False, True])
    m = result.metrics
    assert m["general_acc"] == 0.5 and m["general_seen_acc"] == 1.0 and m["general_heldout_acc"] == 0.0
    assert m["general_acc_cc"] == pytest.approx((0.5 - 1 / 3) / (2 / 3))
    assert m["general_em"] == 0.5
    assert m["infused_acc"] == pytest.approx(2 / 3)
    assert m["infused_seen_acc"] == 0.5 and m["infused_heldout_acc"] == 1.0
    assert m["infused_acc_cc"] == pytest.approx((2 / 3 - 1 / 3) / (2 / 3))
    assert m["infused_em"] == pytest.approx(2 / 3)
    assert m["infused_seen_em"] == 1.0 and m["infused_heldout_em"] == 0.0
    assert m["general_answer_logprob"] == pytest.approx(np.mean([expected_scores[0][0], expected_scores[1][0]]))
    naive_scores, naive_exact = score_candidates_naive(ctl, probes)
    np.testing.assert_allclose(naive_scores, expected_scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(naive_exact, result.probe_exact)


def test_ties_fail_both_metrics(model):
    u = np.zeros(VOCAB)
    u[5], u[6] = 3.0, 3.0  # two greedy tokens: neither is strictly the argmax, their candidates tie
    probes = hand_probes()
    result = evaluate_retention(controlled_model(u), probes, batch_size=4)
    assert result.scores[0, 0] == result.scores[0, 1]
    assert not result.probe_correct[0] and not result.probe_exact[0]  # [5] vs [6]: tie, and 5 ties 6 for argmax
    assert not result.probe_exact.any()
    assert result.probe_correct[4]  # [5] beats [7] and [8]

def test_exact_match_disabled_and_empty_group_is_nan(model, probes):
    general_only = subset(probes, np.flatnonzero(probes.fact_group[probes.fact_index] == 0))
    result = evaluate_retention(model, general_only, batch_size=32, exact_match=False)
    assert result.probe_exact is None
    assert "general_em" not in result.metrics and "infused_em" not in result.metrics
    assert math.isnan(result.metrics["infused_acc"]) and math.isnan(result.metrics["infused_acc_cc"])
    assert not math.isnan(result.metrics["general_acc"])


def test_strictly_best_counts_ties_as_wrong():
    scores = np.array([[-1.0, -2.0, -3.0], [-1.0, -1.0, -3.0], [-5.0, -1.0, -1.0], [-2.0, -3.0, -1.0]])
    np.testing.assert_array_equal(strictly_best(scores, np.array([0, 0, 1, 2])), [True, False, False, True])


def test_chance_corrected_accuracy_is_zero_at_chance_and_one_when_perfect():
    probes = hand_probes()
    chance = retention_metrics(probes, np.array([True, False, False, False, True]))
    assert chance["infused_acc_cc"] == pytest.approx(0.0)  # 1 of 3 infused probes right, 3 choices
    perfect = retention_metrics(probes, np.ones(5, dtype=bool))
    assert perfect["general_acc_cc"] == 1.0 and perfect["infused_acc_cc"] == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: p.prompt.__setitem__(0, np.arange(40, dtype=np.int32)), "positions but the model has 32"),
        (lambda p: p.candidates[1].__setitem__(0, np.array([VOCAB + 500], dtype=np.int32)), "outside the model"),
        (lambda p: p.candidates[2].pop(), "has 2 candidates, expected n_choices=3"),
        (lambda p: p.prompt.__setitem__(3, np.array([], dtype=np.int32)), "empty prompt"),
    ],
)
def test_unscorable_probes_are_refused_with_one_line(model, change, match):
    probes = hand_probes()
    change(probes)
    with pytest.raises(EvalError, match=match) as err:
        evaluate_retention(model, probes, batch_size=4)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_a_model_that_is_not_a_gpt_is_refused():
    with pytest.raises(EvalError, match="not a megatron-core GPTModel"):
        evaluate_retention(torch.nn.Linear(4, 4), hand_probes(), batch_size=4)


# ----------------------------------------------------------------------------------------------------------------
# Tensor parallelism: TP=2 through submitit's local executor gives the TP=1 results


def _evaluate_tp2(probes: ProbeSet, batch_size: int) -> tuple[int, EvalResult, np.ndarray]:
    """One task of a 2-task submitit job: TP=2 model from the same seed, batched evaluation, naive scores."""
    ctx = init_model_parallel(tp=2, expected_world=2)
    try:
        seed_all(SEED)
        gpt = build_model(PRESET, VOCAB, 0.02, "fp32")
        result = evaluate_retention(gpt, probes, batch_size=batch_size)
        naive_scores, _ = score_candidates_naive(gpt, probes, exact_match=False)
        return ctx.tp_rank, result, naive_scores
    finally:
        teardown(ctx)


def test_tensor_parallel_2_gives_tp1_results(model, probes, tmp_path):
    results = run_two_tasks(tmp_path / "jobs", _evaluate_tp2, probes, 8, timeout_min=5)
    reference = evaluate_retention(model, probes, batch_size=8)
    assert sorted(r[0] for r in results) == [0, 1]
    for _, result, naive_scores in results:
        np.testing.assert_allclose(result.scores, reference.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(naive_scores, reference.scores, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(result.probe_correct, reference.probe_correct)
        np.testing.assert_array_equal(result.probe_exact, reference.probe_exact)
        np.testing.assert_array_equal(result.probe_exact, np.arange(30) % 3 == 0)
        for name, value in reference.metrics.items():
            assert result.metrics[name] == pytest.approx(value, abs=1e-6, nan_ok=True)
    np.testing.assert_array_equal(results[0][1].scores, results[1][1].scores)  # ranks agree exactly


def _evaluate_dp2(probes: ProbeSet, batch_size: int) -> tuple[int, EvalResult]:
    """One task of a 2-task submitit job: DP=2 (TP=1), the same weights on both ranks, sharded evaluation."""
    torch.set_num_threads(1)
    ctx = init_model_parallel(tp=1, expected_world=2)
    try:
        seed_all(SEED)
        gpt = build_model(PRESET, VOCAB, 0.02, "fp32")
        return ctx.dp_rank, evaluate_retention(gpt, probes, batch_size=batch_size)
    finally:
        teardown(ctx)


def test_data_parallel_2_splits_the_candidates_and_gives_dp1_results(model, probes, tmp_path):
    results = run_two_tasks(tmp_path / "jobs", _evaluate_dp2, probes, 8, timeout_min=5)
    reference = evaluate_retention(model, probes, batch_size=8)
    total = len(probes.prompt) * probes.n_choices  # 120 candidates in 15 batches of 8: 8 batches and 7
    assert reference.scored_here == total
    assert sorted((rank, r.scored_here) for rank, r in results) == [(0, 64), (1, 56)]
    for _, result in results:
        np.testing.assert_array_equal(result.scores, reference.scores)  # the same batches, the same passes
        np.testing.assert_array_equal(result.probe_correct, reference.probe_correct)
        np.testing.assert_array_equal(result.probe_exact, reference.probe_exact)
        assert result.metrics == pytest.approx(reference.metrics, nan_ok=True)


def test_bf16_model_scores_with_fp32_logits(model, probes):
    """A bf16 model's scored positions are projected in fp32: the scores equal log-softmax over fp32 logits of
    the model's own (bf16) final hidden states, computed here independently, one sequence at a time."""
    gpt = build_model(PRESET, VOCAB, 0.02, "fp32")
    gpt.load_state_dict(model.state_dict())
    gpt = gpt.to(torch.bfloat16)
    scores, _ = score_candidates(gpt, probes, batch_size=8, exact_match=False)
    weight = gpt.shared_embedding_or_output_weight().float()
    captured = {}
    hook = gpt.output_layer.register_forward_pre_hook(lambda m, a, k: captured.update(h=(a or (k["input_"],))[0]),
                                                      with_kwargs=True)
    try:
        for p in (0, 1, 2, 17):
            prompt = np.asarray(probes.prompt[p], dtype=np.int64)
            for c, cand in enumerate(probes.candidates[p]):
                tokens = torch.from_numpy(np.concatenate([prompt, np.asarray(cand, dtype=np.int64)]))
                length = len(tokens) - 1
                mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
                with torch.no_grad():
                    gpt(input_ids=tokens[None, :-1], position_ids=torch.arange(length)[None], attention_mask=mask)
                logits = (captured["h"][:, 0].float() @ weight.t())[len(prompt) - 1:].double()
                target = tokens[len(prompt):]
                expect = torch.log_softmax(logits, -1).gather(1, target[:, None]).sum().item()
                assert scores[p, c] == pytest.approx(expect, abs=1e-4), (p, c)
    finally:
        hook.remove()


def test_llama_model_batched_scores_equal_naive_loop():
    """RoPE, SwiGLU, RMSNorm, GQA and an untied output layer (which the scoring pre-hook then selects on)."""
    ctx = init_model_parallel(1)
    try:
        seed_all(SEED)
        gpt = build_model(BUILTIN_PRESETS["cpu-s-llama"], VOCAB, 0.02, "fp32")
        assert gpt.output_layer.weight is not None  # untied
        probes = random_probes(gpt, np.random.default_rng(0), n_facts=12, n_probes=30, n_choices=4)
        ref_scores, ref_exact = score_candidates_naive(gpt, probes)
        for project_scored_only in (True, False):
            scores, exact = score_candidates(gpt, probes, batch_size=16, project_scored_only=project_scored_only)
            np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-5)
            np.testing.assert_array_equal(exact, ref_exact)
        np.testing.assert_array_equal(exact, np.arange(30) % 3 == 0)  # only greedy continuations match
    finally:
        teardown(ctx)
