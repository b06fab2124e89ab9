"""Knowledge retention of a megatron-core GPTModel: batched multiple-choice and greedy exact match over a ProbeSet.

Each probe is a prompt whose correct object competes with k distractors. A candidate's score is the summed
log-probability of its tokens right after the prompt (shared/science.md). All candidates of all probes are scored in
large right-padded batches: sequences are sorted by length so that a batch pads little, and one forward pass scores
`batch_size` candidates at once.

Why it is right under tensor parallelism: the logits of megatron's GPTModel are vocab-parallel (each TP rank holds a
slice of the vocabulary). Log-probabilities come from megatron's own `tensor_parallel.vocab_parallel_cross_entropy`
(the loss the model trains with), and greedy exact match compares the target's logit with the largest other logit
after a MAX all-reduce over the TP group, so every TP rank gets the same answer for any TP degree.

Why padding is harmless: attention is causal and padding is on the right, so no scored position ever attends to a
padding token; padded positions are never scored. Only the candidates' positions reach the vocabulary projection
(a pre-hook on the output layer selects them while scoring): prompt and padding positions cost no logits.

Why it costs 1/DP per rank under data parallelism: the length-sorted batches are dealt round-robin over the DP
ranks (each TP group scores its share together), and one sum all-reduce over the DP group gives every rank the
whole score table: a candidate is scored on exactly one DP rank and the others contribute exact zeros, so the
result is bit-identical to scoring everything on one rank (the same batches, the same forward passes).

Why bf16 does not bias exact match: in a bf16 model the vocabulary projection of the scored positions is computed
in fp32 (hidden states and output weights upcast), so near-ties are not broken by bf16 rounding of the logits.

Ties are failures: a probe is multiple-choice correct only if the correct candidate's score is strictly greater than
every distractor's (an untrained model that scores all candidates alike sits at 0, not at chance), and a greedy
exact match needs the target token's logit strictly above every other token's at each answer position.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.utils import VocabUtility

from kislurm.data.knowledge import HeldoutDocs, ProbeSet
from kislurm.errors import EvalError  # noqa: F401 (re-exported)

GROUPS: tuple[str, ...] = ("general", "infused")
"""Probe groups, indexed by ProbeSet.fact_group (0 = general fact, 1 = infused fact)."""


@dataclass(frozen=True)
class EvalResult:
    """Retention of one model on one probe set."""

    metrics: dict[str, float]
    """{group}_acc, _seen_acc, _heldout_acc, _acc_cc, _answer_logprob and, with exact match, _em, _seen_em,
    _heldout_em, for group in GROUPS; NaN where a group (or its seen/held-out part) has no probe."""
    probe_correct: np.ndarray
    """(P,) bool: multiple-choice correct (the answer's score strictly best)."""
    probe_exact: np.ndarray | None
    """(P,) bool: greedy decoding after the prompt reproduces the answer's tokens (None when disabled)."""
    scores: np.ndarray | None = None
    """(P, n_choices) float64: summed log-probability of each candidate."""
    scored_here: int = 0
    """Candidate sequences this rank scored (its DP share; all of them at DP=1)."""


@dataclass(frozen=True)
class _Sequences:
    """Every (probe, candidate) pair flattened to one token sequence: prompt + candidate."""

    tokens: list[np.ndarray]  # (N,) prompt followed by candidate, int64; N = P * n_choices, probe-major
    prompt_len: np.ndarray  # (N,) int64
    input_len: np.ndarray  # (N,) int64: tokens fed to the model = len(tokens) - 1
    is_answer: np.ndarray  # (N,) bool: the probe's correct candidate (the one exact match is checked for)


# ----------------------------------------------------------------------------------------------------------------
# Public API


def evaluate_retention(model, probes: ProbeSet, batch_size: int, exact_match: bool = True) -> EvalResult:
    """Score every candidate of every probe and return retention metrics plus per-probe outcomes.

    `model` is a megatron-core GPTModel (or a wrapper with `.module`, e.g. megatron DDP); under tensor parallelism
    every TP rank must call this collectively and gets the same result. The model is put in eval mode, run under
    torch.no_grad, and each module's training flag is restored afterwards.
    """
    scores, probe_exact, scored_here = _score_all(model, probes, batch_size, exact_match, True, shard_over_dp=True)
    answer = np.asarray(probes.answer, dtype=np.int64)
    correct = strictly_best(scores, answer)
    answer_logprob = scores[np.arange(len(answer)), answer]
    metrics = retention_metrics(probes, correct, probe_exact, answer_logprob)
    return EvalResult(metrics=metrics, probe_correct=correct, probe_exact=probe_exact, scores=scores,
                      scored_here=scored_here)


def score_candidates(
    model, probes: ProbeSet, batch_size: int, exact_match: bool = True, project_scored_only: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Summed log-probability (P, C) of every candidate after its prompt, and (P,) greedy exact match of each
    probe's answer (None when exact_match is False).

    Batched: candidates of all probes sorted by length, right-padded, `batch_size` sequences per forward pass.
    project_scored_only: run the output layer on the candidates' positions only (prompt and padding positions
    never reach the vocabulary projection); False projects every position (the fallback that sequence-parallel or
    multi-token-prediction models take automatically).
    """
    scores, probe_exact, _ = _score_all(model, probes, batch_size, exact_match, project_scored_only,
                                        shard_over_dp=False)
    return scores, probe_exact


def _score_all(model, probes: ProbeSet, batch_size: int, exact_match: bool, project_scored_only: bool,
               shard_over_dp: bool) -> tuple[np.ndarray, np.ndarray | None, int]:
    """score_candidates, with the batches dealt over the DP ranks when `shard_over_dp` (a collective over the DP
    group then: every DP rank must call it); also returns how many candidates this rank scored."""
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}; fix: pass a positive batch size")
    core = _unwrap(model)
    check_probes(probes, max_length=core.max_sequence_length, vocab_size=core.vocab_size)
    seqs = _flatten(probes)
    scores, misses, scored_here = _score_sequences(model, seqs, batch_size, exact_match, project_scored_only,
                                                   shard_over_dp)
    greedy = (misses == 0).cpu().numpy()
    n_probes = len(probes.prompt)
    probe_exact = greedy[seqs.is_answer] if exact_match else None  # answer rows in probe order
    return scores.cpu().numpy().reshape(n_probes, probes.n_choices), probe_exact, scored_here


def _score_sequences(model, seqs: _Sequences, batch_size: int, exact_match: bool, project_scored_only: bool,
                     shard_over_dp: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(N,) float64 summed log-probability of each sequence's scored tokens (after its prompt), (N,) int32 tokens
    that greedy decoding misses, and how many sequences this rank scored. With `shard_over_dp` the batches are dealt
    over the DP ranks and the results all-reduced as sums (each sequence is scored on exactly one rank)."""
    core = _unwrap(model)
    n = len(seqs.tokens)
    device = _device(core)
    scores = torch.zeros(n, dtype=torch.float64, device=device)
    misses = torch.zeros(n, dtype=torch.int32, device=device)  # 0 = greedy decoding reproduces the candidate
    order = np.argsort(seqs.input_len, kind="stable")
    dp_rank, dp = _dp_share() if shard_over_dp else (0, 1)
    starts = list(range(0, n, batch_size))[dp_rank::dp]  # round-robin: every rank gets short and long batches
    project_scored_only = project_scored_only and _can_project_scored_only(core)
    scored_here = 0
    with eval_mode(model), torch.no_grad():
        for start in starts:
            rows = order[start : start + batch_size]
            inputs, labels, scored = _pad_batch(seqs, rows, device)
            need_exact = torch.from_numpy(seqs.is_answer[rows] & exact_match).to(device)
            logits = _scored_logits(model, core, inputs, scored, project_scored_only)
            batch_scores, batch_misses = _score_batch(logits, labels, scored, need_exact)
            index = torch.from_numpy(rows).to(device)
            scores[index] = batch_scores
            misses[index] = batch_misses
            scored_here += len(rows)
    if dp > 1:  # each candidate was scored on exactly one DP rank; the others hold exact zeros for it
        group = parallel_state.get_data_parallel_group()
        torch.distributed.all_reduce(scores, group=group)
        torch.distributed.all_reduce(misses, group=group)
    return scores, misses, scored_here


def score_continuations(model, contexts: list[np.ndarray], continuations: list[np.ndarray],
                        batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed log-probability (N,) float64 of each continuation right after its context, whether greedy decoding
    reproduces it (N,) bool (the target's logit strictly above every other token's at each position), and how many
    sequences this rank scored: the probes' scorer for arbitrary (context, continuation) token pairs, which is
    what lm-eval's loglikelihood requests are (kislurm.retention.downstream).

    A collective over the model's DP and TP groups (every rank calls it with the same pairs and gets the whole
    result); the batches are dealt over the DP ranks as for the probes. Each context needs a token, and each pair
    must fit the model's sequence length (the caller truncates)."""
    if len(contexts) != len(continuations):
        raise EvalError(f"{len(contexts)} contexts but {len(continuations)} continuations; fix: pass one each")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}; fix: pass a positive batch size")
    core = _unwrap(model)
    tokens, prompt_len = [], []
    for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
        if len(ctx) == 0 or len(cont) == 0:
            raise EvalError(f"request {i} has an empty {'context' if len(ctx) == 0 else 'continuation'}; fix: "
                            "give every context and continuation a token (an empty context starts with EOD)")
        tokens.append(np.concatenate([np.asarray(ctx, np.int64), np.asarray(cont, np.int64)]))
        prompt_len.append(len(ctx))
    if not tokens:
        return np.zeros(0), np.zeros(0, bool), 0
    input_len = np.fromiter((len(t) - 1 for t in tokens), dtype=np.int64, count=len(tokens))
    if int(input_len.max()) > core.max_sequence_length:
        i = int(input_len.argmax())
        raise EvalError(f"request {i} needs {input_len[i]} positions but the model has {core.max_sequence_length}; "
                        "fix: truncate its context from the left")
    seqs = _Sequences(tokens=tokens, prompt_len=np.asarray(prompt_len, np.int64), input_len=input_len,
                      is_answer=np.ones(len(tokens), dtype=bool))  # greedy match is checked for every pair
    scores, misses, scored_here = _score_sequences(model, seqs, batch_size, True, True, shard_over_dp=True)
    return scores.cpu().numpy(), (misses == 0).cpu().numpy(), scored_here


def sequence_limit(model) -> int:
    """Positions the model attends over (its max_sequence_length): the longest context + continuation - 1."""
    return int(_unwrap(model).max_sequence_length)


def heldout_loss(model, docs: HeldoutDocs, batch_size: int) -> dict[str, float]:
    """Mean loss per token (nats) and bits per byte of the held-out general documents.

    Each document is scored after its context token, its own EOD left out. A document longer than the model's
    window is cut into pieces, each predicted after the token before it. Like the probes, the batches are dealt over
    the DP ranks (a collective over the DP group). Each piece's NLL is summed in float64 and all-reduced as a sum,
    then the pieces are summed in one fixed order on the host, so DP=N gives DP=1's numbers. Bits per byte: the
    summed NLL / (ln 2 x the documents' UTF-8 bytes)."""
    core = _unwrap(model)
    window = int(core.max_sequence_length)
    tokens, prompt_len = [], []
    for doc in docs.tokens:
        doc = np.asarray(doc, dtype=np.int64)
        for start in range(0, len(doc), window):
            before = docs.context if start == 0 else int(doc[start - 1])
            tokens.append(np.concatenate([[before], doc[start: start + window]]))
            prompt_len.append(1)
    if not tokens:
        raise EvalError("no held-out documents to score; fix: raise data.heldout_general or leave it at 0")
    ids = np.concatenate(tokens)
    if ids.min() < 0 or ids.max() >= core.vocab_size:
        raise EvalError(f"a held-out document has a token id outside the model's vocabulary [0, {core.vocab_size}); "
                        "fix: build the model with this tokenizer's vocab size")
    seqs = _Sequences(tokens=tokens, prompt_len=np.asarray(prompt_len, dtype=np.int64),
                      input_len=np.array([len(t) - 1 for t in tokens], dtype=np.int64),
                      is_answer=np.zeros(len(tokens), dtype=bool))
    sums, _, _ = _score_sequences(model, seqs, batch_size, False, True, shard_over_dp=True)
    nll = -float(np.sum(sums.cpu().numpy(), dtype=np.float64))
    n_tokens = int(seqs.input_len.sum())
    n_bytes = int(np.sum(docs.n_bytes))
    return {"heldout_loss": nll / n_tokens, "heldout_bpb": nll / (math.log(2) * n_bytes) if n_bytes else math.nan}


def _dp_share() -> tuple[int, int]:
    """(DP rank, DP size) of this process; (0, 1) outside megatron's parallel state."""
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def score_candidates_naive(model, probes: ProbeSet, exact_match: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference scorer: one unpadded forward per (probe, candidate), full-vocabulary logits, float64 log_softmax.

    Returns what score_candidates returns. Independent of the batched path on purpose (gathered logits instead of
    vocab-parallel cross entropy, every position projected, no padding, no sorting): the tests check the two
    agree, and tools/bench_evaluate.py uses this as the baseline.
    """
    core = _unwrap(model)
    check_probes(probes, max_length=core.max_sequence_length, vocab_size=core.vocab_size)
    device = _device(core)
    n_probes, n_choices = len(probes.prompt), probes.n_choices
    scores = np.empty((n_probes, n_choices), dtype=np.float64)
    exact = np.zeros(n_probes, dtype=bool)
    with eval_mode(model), torch.no_grad():
        for p in range(n_probes):
            prompt = np.asarray(probes.prompt[p], dtype=np.int64)
            for c in range(n_choices):
                cand = np.asarray(probes.candidates[p][c], dtype=np.int64)
                tokens = torch.from_numpy(np.concatenate([prompt, cand])).to(device)
                length = len(tokens) - 1
                logits = model(
                    input_ids=tokens[None, :-1],
                    position_ids=torch.arange(length, device=device)[None],
                    attention_mask=attention_mask(length, device),
                    runtime_gather_output=True,
                )[0, len(prompt) - 1 :].double()
                target = tokens[len(prompt) :]
                logp = torch.log_softmax(logits, dim=-1)
                scores[p, c] = logp.gather(1, target[:, None]).sum().item()
                if c == probes.answer[p]:
                    top2 = torch.topk(logits, 2, dim=-1)
                    strict = (top2.indices[:, 0] == target) & (top2.values[:, 0] > top2.values[:, 1])
                    exact[p] = bool(strict.all())
    return scores, (exact if exact_match else None)


def strictly_best(scores: np.ndarray, answer: np.ndarray) -> np.ndarray:
    """(P,) bool: the answer's score is strictly greater than every other candidate's (ties count as wrong)."""
    idx = np.arange(len(answer))
    others = scores.copy()
    others[idx, answer] = -np.inf
    return scores[idx, answer] > others.max(axis=1)


def retention_metrics(
    probes: ProbeSet,
    correct: np.ndarray,
    exact: np.ndarray | None = None,
    answer_logprob: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics named as in the contract: per group, acc over all/seen/held-out templates, chance-corrected acc, em.

    chance = 1 / n_choices; acc_cc = (acc - chance) / (1 - chance) over all templates. A group (or part) with no
    probe gives NaN.
    """
    group = np.asarray(probes.fact_group)[np.asarray(probes.fact_index)]
    heldout = np.asarray(probes.heldout, dtype=bool)
    chance = 1.0 / probes.n_choices
    metrics: dict[str, float] = {}
    for gid, name in enumerate(GROUPS):
        sel = group == gid
        acc = _mean(correct[sel])
        metrics[f"{name}_acc"] = acc
        metrics[f"{name}_seen_acc"] = _mean(correct[sel & ~heldout])
        metrics[f"{name}_heldout_acc"] = _mean(correct[sel & heldout])
        metrics[f"{name}_acc_cc"] = (acc - chance) / (1.0 - chance)
        if exact is not None:
            metrics[f"{name}_em"] = _mean(exact[sel])
            metrics[f"{name}_seen_em"] = _mean(exact[sel & ~heldout])
            metrics[f"{name}_heldout_em"] = _mean(exact[sel & heldout])
        if answer_logprob is not None:
            metrics[f"{name}_answer_logprob"] = _mean(answer_logprob[sel])
    return metrics


def check_probes(probes: ProbeSet, max_length: int, vocab_size: int) -> None:
    """Refuse a probe set that cannot be scored: ragged arrays, empty prompts or candidates, too long, bad ids."""
    n, k = len(probes.prompt), probes.n_choices
    for key in ("fact_index", "heldout", "answer", "candidates"):
        if len(getattr(probes, key)) != n:
            raise EvalError(f"ProbeSet.{key} has {len(getattr(probes, key))} entries but there are {n} prompts; "
                            "fix: rebuild the probe set")
    if k < 2:
        raise EvalError(f"ProbeSet.n_choices is {k}; fix: give each probe at least one distractor")
    if n == 0:
        return
    answer, fact_index = np.asarray(probes.answer), np.asarray(probes.fact_index)
    if answer.min() < 0 or answer.max() >= k:
        raise EvalError(f"ProbeSet.answer has an index outside [0, {k}); fix: rebuild the probe set")
    if fact_index.min() < 0 or fact_index.max() >= len(probes.fact_ids):
        raise EvalError("ProbeSet.fact_index points outside fact_ids; fix: rebuild the probe set")
    counts = np.fromiter(map(len, probes.candidates), dtype=np.int64, count=n)
    for p in np.flatnonzero(counts != k)[:1]:
        raise EvalError(f"probe {p} has {counts[p]} candidates, expected n_choices={k}; fix: rebuild the probe set")
    prompt_len = np.fromiter(map(len, probes.prompt), dtype=np.int64, count=n)
    for p in np.flatnonzero(prompt_len == 0)[:1]:
        raise EvalError(f"probe {p} has an empty prompt; fix: every prompt needs at least one token")
    cand_len = np.fromiter((len(c) for row in probes.candidates for c in row), dtype=np.int64, count=n * k)
    cand_len = cand_len.reshape(n, k)
    for p, c in np.argwhere(cand_len == 0)[:1]:
        raise EvalError(f"probe {p} candidate {c} has no tokens; fix: every candidate needs a token")
    need = prompt_len[:, None] + cand_len - 1
    for p, c in np.argwhere(need > max_length)[:1]:
        raise EvalError(f"probe {p} candidate {c} needs {need[p, c]} positions but the model has {max_length}; "
                        "fix: shorten the template or raise seq_length")
    ids = np.concatenate([*probes.prompt, *(c for row in probes.candidates for c in row)])
    if ids.min() < 0 or ids.max() >= vocab_size:
        bad = next(p for p in range(n) if _outside([probes.prompt[p], *probes.candidates[p]], vocab_size))
        raise EvalError(f"probe {bad} has a token id outside the model's vocabulary [0, {vocab_size}); "
                        "fix: build the model with this tokenizer's vocab size")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def attention_mask(length: int, device: torch.device) -> torch.Tensor | None:
    """What GPTModel's causal attention is given: None on a GPU (megatron's default causal mask, the one training
    uses and the one Transformer Engine expects); on the CPU an explicit (1, 1, L, L) bool mask, True above the
    diagonal (= masked), because megatron's default builds it with device='cuda' (kislurm.train.cpu_shims patches that
    too, but scoring should not depend on it)."""
    if device.type == "cuda":
        return None
    return torch.triu(torch.ones(length, length, dtype=torch.bool, device=device), diagonal=1)[None, None]


# ----------------------------------------------------------------------------------------------------------------
# Internals


def _outside(arrays: list[np.ndarray], vocab_size: int) -> bool:
    ids = np.concatenate(arrays)
    return int(ids.min()) < 0 or int(ids.max()) >= vocab_size


def _flatten(probes: ProbeSet) -> _Sequences:
    tokens, prompt_len = [], []
    for prompt, cands in zip(probes.prompt, probes.candidates):
        prompt = np.asarray(prompt, dtype=np.int64)
        for cand in cands:
            tokens.append(np.concatenate([prompt, np.asarray(cand, dtype=np.int64)]))
            prompt_len.append(len(prompt))
    input_len = np.fromiter((len(t) - 1 for t in tokens), dtype=np.int64, count=len(tokens))
    is_answer = np.zeros((len(probes.prompt), probes.n_choices), dtype=bool)
    is_answer[np.arange(len(probes.prompt)), np.asarray(probes.answer, dtype=np.int64)] = True
    return _Sequences(tokens=tokens, prompt_len=np.asarray(prompt_len, dtype=np.int64), input_len=input_len,
                      is_answer=is_answer.reshape(-1))


def _pad_batch(
    seqs: _Sequences, rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs and labels (B, L) and the bool mask of scored positions (the candidate's tokens)."""
    width = int(seqs.input_len[rows].max())
    inputs = np.zeros((len(rows), width), dtype=np.int64)
    labels = np.zeros((len(rows), width), dtype=np.int64)
    scored = np.zeros((len(rows), width), dtype=bool)
    for b, r in enumerate(rows):
        seq, n = seqs.tokens[r], seqs.input_len[r]
        inputs[b, :n] = seq[:-1]
        labels[b, :n] = seq[1:]
        scored[b, seqs.prompt_len[r] - 1 : n] = True
    return (torch.from_numpy(inputs).to(device), torch.from_numpy(labels).to(device),
            torch.from_numpy(scored).to(device))


def _forward(model, inputs: torch.Tensor) -> torch.Tensor:
    """The model's output with vocab-parallel logits (never gathered, whatever the model's parallel_output)."""
    length = inputs.shape[1]
    positions = torch.arange(length, device=inputs.device)[None].expand_as(inputs)
    return model(
        input_ids=inputs,
        position_ids=positions,
        attention_mask=attention_mask(length, inputs.device),
        runtime_gather_output=False,
    )


def _can_project_scored_only(core: torch.nn.Module) -> bool:
    """Selecting positions before the output layer needs whole sequences there and a single output-layer call."""
    config = core.config
    return not getattr(config, "sequence_parallel", False) and getattr(config, "mtp_num_layers", None) is None


@contextlib.contextmanager
def _output_layer_sees(core: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """While active, GPTModel's output layer receives only the hidden states at `positions` ((L, B) bool mask over
    its (L, B, H) input), as an (M, 1, H) tensor: the vocabulary projection skips prompt and padding positions."""

    def select(module, args, kwargs):
        if args:
            return (args[0][positions].unsqueeze(1), *args[1:]), kwargs
        return args, {**kwargs, "input_": kwargs["input_"][positions].unsqueeze(1)}

    layer = core.output_layer
    handle = layer.register_forward_pre_hook(select, with_kwargs=True)
    low_precision = core.shared_embedding_or_output_weight().dtype != torch.float32  # bf16 runs
    if low_precision:
        layer.forward = functools.partial(_fp32_projection, layer)  # this instance only, while scoring
    try:
        yield
    finally:
        handle.remove()
        if low_precision:
            del layer.forward


def _fp32_projection(layer: torch.nn.Module, input_: torch.Tensor, weight: torch.Tensor | None = None,
                     runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
    """The output layer (a ColumnParallelLinear without bias or sequence parallelism) computed in fp32: this TP
    rank's vocabulary slice of the logits, as the layer returns them when not gathering."""
    w = weight if weight is not None else layer.weight
    return torch.nn.functional.linear(input_.float(), w.float()), None


def _scored_logits(
    model, core: torch.nn.Module, inputs: torch.Tensor, scored: torch.Tensor, project_scored_only: bool
) -> torch.Tensor:
    """(M, V / TP) vocab-parallel logits at the scored positions, in (position, sequence) order (scored.t())."""
    positions = scored.t()
    if not project_scored_only:
        return _forward(model, inputs).transpose(0, 1)[positions]
    with _output_layer_sees(core, positions):
        logits = _forward(model, inputs)  # (1, M, V / TP)
    n_scored = int(positions.sum())
    if logits.shape[:2] != (1, n_scored):
        raise RuntimeError(f"megatron's GPTModel returned logits of shape {tuple(logits.shape)} for {n_scored} "
                           "selected positions; its output path changed: fix: score with project_scored_only=False")
    return logits[0]


def _score_batch(
    logits: torch.Tensor, labels: torch.Tensor, scored: torch.Tensor, need_exact: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence summed log-prob of the scored labels (float64), and per sequence the number of scored labels
    that are not the strict argmax (counted for rows in need_exact only; 0 elsewhere). `logits` are the scored
    positions in (position, sequence) order."""
    positions = scored.t()
    rows = positions.nonzero()[:, 1]
    target = labels.t()[positions]
    n = scored.shape[0]
    misses = torch.zeros(n, dtype=torch.int32, device=logits.device)
    check = need_exact[rows]
    if bool(check.any()):  # the same on every TP rank: the batches are identical
        is_max = _strict_argmax(logits[check].float(), target[check])
        misses.index_add_(0, rows[check], (~is_max).int())
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)  # -log p; in place
    sums = torch.zeros(n, dtype=torch.float64, device=logits.device).index_add_(0, rows, -nll.double())
    return sums, misses


def _strict_argmax(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M,) bool: target's logit strictly above every other token's, the vocabulary split over TP ranks."""
    start, end = _vocab_range(logits.shape[-1])
    local = (target >= start) & (target < end)
    idx = torch.arange(len(target), device=logits.device)
    local_target = torch.where(local, target - start, torch.zeros_like(target))
    target_logit = torch.where(local, logits[idx, local_target], torch.full_like(target, -math.inf, dtype=logits.dtype))
    top2 = torch.topk(logits, 2, dim=-1)  # the best other token is the first of the two that is not the target
    first_is_target = local & (top2.indices[:, 0] == local_target)
    other_max = torch.where(first_is_target, top2.values[:, 1], top2.values[:, 0])
    _tp_all_reduce_max(target_logit)
    _tp_all_reduce_max(other_max)
    return target_logit > other_max


def _vocab_range(local_vocab: int) -> tuple[int, int]:
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(local_vocab, rank, world)
    return int(start), int(end)


def _tp_all_reduce_max(tensor: torch.Tensor) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(
            tensor, op=torch.distributed.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group()
        )


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside wrappers (megatron DDP, Float16Module), for its attributes; forward uses the wrapper."""
    core = model
    while not hasattr(core, "max_sequence_length") and hasattr(core, "module"):
        core = core.module
    if not (hasattr(core, "max_sequence_length") and hasattr(core, "vocab_size")):
        raise EvalError(f"{type(model).__name__} is not a megatron-core GPTModel; fix: pass the model build_model made")
    return core


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan
