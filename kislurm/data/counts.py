"""A cell's realised data statistics, counted from megatron-core's own blend indices (never from kislurm's plan).

`doc_usage` reads, in bounded chunks, how often each document of each stream of a blend is drawn; `fact_exposures`
turns document draws into exposures per fact through the stream's stream.npz; `blend_stats` is the JSON-able record
of one cell's blend (kislurm.data.mixes adds what each control guarantees).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kislurm.data.folder import PreparedData

CHUNK_SAMPLES = 1 << 22   # megatron indices are counted in chunks of this many samples (bounded memory)


def doc_usage(dataset, n: int, seq_length: int, n_docs: list[int]) -> tuple[list[np.ndarray], list[bool], list[int]]:
    """Per stream of the blend: times each of its documents is drawn by the first n samples, whether every drawn
    sample is exactly one document, and how many samples it serves; read from megatron's own indices in chunks of
    CHUNK_SAMPLES samples, so memory stays bounded at any token budget."""
    counts = [np.zeros(d, dtype=np.int64) for d in n_docs]
    whole, used = [True] * len(n_docs), [0] * len(n_docs)
    for c0 in range(0, n, CHUNK_SAMPLES):
        which = np.asarray(dataset.dataset_index[c0: min(n, c0 + CHUNK_SAMPLES)])
        within = np.asarray(dataset.dataset_sample_index[c0: c0 + len(which)])
        for d, gpt in enumerate(dataset.datasets):
            idx = np.asarray(gpt.shuffle_index)[within[which == d]].astype(np.int64)
            sample_index = gpt.sample_index
            end, start = np.asarray(sample_index[idx + 1]), np.asarray(sample_index[idx])
            whole[d] &= bool(np.all(end[:, 1] == seq_length) and np.all((end[:, 0] - start[:, 0] == 1) | (idx == 0)))
            docs = np.asarray(gpt.document_index)[end[:, 0]]
            counts[d] += np.bincount(docs, minlength=n_docs[d])[: n_docs[d]]
            used[d] += len(idx)
    return counts, whole, used


def fact_exposures(stream_dir: Path, doc_counts: np.ndarray, n_facts: int) -> tuple[np.ndarray, int]:
    """Exposures of every fact and non-pad tokens, given how often each packed document is trained on."""
    z = np.load(stream_dir / "stream.npz")
    per_sentence = np.repeat(doc_counts[: len(z["bounds"]) - 1], np.diff(z["bounds"]))
    exposures = np.bincount(z["fact"], weights=per_sentence, minlength=n_facts).astype(np.int64)
    return exposures, int(np.dot(doc_counts[: len(z["doc_tokens"])], z["doc_tokens"]))


def gpt_doc_counts(gpt: Any, m: int, n_docs: int) -> np.ndarray:
    """Times each document of a GPTDataset is drawn by its first m samples (one document per sample, as kislurm
    packs), from its own shuffle, sample and document indices."""
    idx = np.asarray(gpt.shuffle_index)[:m].astype(np.int64)
    end = np.asarray(gpt.sample_index[idx + 1])
    return np.bincount(np.asarray(gpt.document_index)[end[:, 0]], minlength=n_docs)[:n_docs]


def min_mean_max(x: np.ndarray, prefix: str) -> dict:
    """{prefix}_min, _mean and _max of x (0 when empty), as JSON numbers."""
    if len(x) == 0:
        return {f"{prefix}_min": 0, f"{prefix}_mean": 0.0, f"{prefix}_max": 0}
    return {f"{prefix}_min": int(x.min()), f"{prefix}_mean": float(x.mean()), f"{prefix}_max": int(x.max())}


def blend_stats(prepared: PreparedData, dataset, n: int, ratio: float, kinfo: dict, weights: list[float]) -> dict:
    """Realised data statistics of the first n samples (the trained ones), JSON-able."""
    L = prepared.seq_length
    gdir = Path(prepared.general_prefix).parent
    g_docs = json.loads((gdir / "info.json").read_text())["docs"] if prepared.general_is_facts else 0
    (g_counts, k_counts), (g_whole, k_whole), (g_used, k_used) = doc_usage(dataset, n, L, [g_docs, kinfo["docs"]])
    exposures, k_tokens = fact_exposures(Path(kinfo["prefix"]).parent, k_counts, len(prepared.knowledge.facts))
    infused = exposures[: kinfo["facts"]]
    stats: dict[str, Any] = {
        "policy": prepared.data.policy, "ratio": ratio, "n_samples": n, "blend_size": len(dataset),
        "seq_length": L, "knowledge_samples": int(k_used), "general_samples": int(n - k_used),
        "knowledge_share_positions": k_used / n, "blend_weights": weights,
        "infused_facts": int(kinfo["facts"]), "infused_facts_exposed": int((infused > 0).sum()),
        **min_mean_max(infused, "exposures_per_fact"),
        "exposures_per_fact_target": (prepared.data.exposures_per_fact
                                      if prepared.data.policy == "fixed_exposures" else None),
        "knowledge_stream": str(Path(kinfo["prefix"]).relative_to(prepared.root)),
        "knowledge_docs": int(kinfo["docs"]), "knowledge_tokens": k_tokens,
        "knowledge_pass_units": int(kinfo["units"]), "knowledge_epochs": int(kinfo["epochs"]),
        "neighbour_sharing_max": kinfo["neighbour_sharing"]["max"],
        "neighbour_sharing_mean": kinfo["neighbour_sharing"]["mean_all_pairs"],
    }
    if prepared.general_is_facts:
        g_exp, g_tokens = fact_exposures(gdir, g_counts, len(prepared.general.facts))
        stats.update(min_mean_max(g_exp, "general_exposures_per_fact"),
                     general_facts_exposed=int((g_exp > 0).sum()), general_tokens_assumed_unpadded=False)
    else:
        g_whole, g_tokens = True, int(g_used * L)   # a user's corpus: packed without padding
        stats.update(general_exposures_per_fact_min=None, general_exposures_per_fact_mean=None,
                     general_exposures_per_fact_max=None, general_facts_exposed=None,
                     general_tokens_assumed_unpadded=True)
    total = k_tokens + g_tokens
    stats.update(general_tokens=g_tokens, knowledge_share_tokens=k_tokens / total if total else 0.0,
                 pad_fraction=1.0 - total / (n * L), samples_are_whole_documents=bool(k_whole and g_whole))
    return stats
