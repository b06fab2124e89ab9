#!/usr/bin/env python
"""Benchmark of `kislurm corpus` on the project's real corpus (WordNet 3.0 synsets, tools/real_corpus.py).

    python tools/bench_corpus.py [--work DIR] [--tokenizer tokenizer.json] [--scales 1,4,16] [--words 2000000]

1. Speed: tokens/s of build_corpus (read, encode, write, merge; in this process, imports done) against the same
   tokenizer's own `encode_batch` on the same documents already in memory, no I/O (the limit). Goal: >= 0.8.
   Five interleaved pairs; the median of the per-pair ratios (wall and CPU time). Also timed apart, not in the
   limit: freeing encode_batch's Encoding objects, which kislurm pays inside its time (ratio_with_free). Then the
   same on documents of ~4,000 characters (consecutive synsets joined, as web text runs), where kislurm cannot
   join short documents into strings (speed_long).
2. Memory: peak RSS summed over the process tree (psutil, sampled every 10 ms) of the `kislurm corpus` command at 1x,
   4x and 16x the corpus and on N one-word documents; then of the merge alone (kislurm's streaming merge, and
   megatron-core's IndexedDatasetBuilder.add_index loop on the same shards) with its time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from kislurm.data.corpus import build_corpus
from kislurm.data.wordnet import wordnet_documents, write_wordnet_jsonl


def tree_peak(cmd: list[str]) -> tuple[float, float, str]:
    """(seconds, peak MB summed over the process and its children, stdout) of a command."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = [0]
    root = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.01)

    t0 = time.perf_counter()
    th = threading.Thread(target=sample)
    th.start()
    out, _ = proc.communicate()
    th.join()
    if proc.returncode:
        raise SystemExit(f"{cmd}: exit {proc.returncode}")
    return time.perf_counter() - t0, peak[0] / 2**20, out.strip()


def speed(jsonl: Path, tokenizer: Path, work: Path, reps: int = 5) -> dict:
    """kislurm's tokens/s against encode_batch's on the same documents: `reps` interleaved pairs, each ratio taken
    within its pair (the cores are shared, so the load moves between pairs), and the median of the ratios."""
    import statistics

    from tokenizers import Tokenizer

    from megatron.core.datasets import indexed_dataset

    assert indexed_dataset.DType   # imported first: a long build pays its imports once
    tok = Tokenizer.from_file(str(tokenizer))
    texts = [json.loads(line)["text"] for line in jsonl.open(encoding="utf-8")]
    pairs, tokens = [], 0
    for rep in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        encs = tok.encode_batch(texts, add_special_tokens=False)
        limit, limit_cpu = time.perf_counter() - t0, time.process_time() - c0
        tokens = sum(len(e.ids) for e in encs) + len(texts)
        t0 = time.perf_counter()
        del encs                    # outside the limit, as before; timed apart: kislurm frees its encodings too
        free = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        r = build_corpus([str(jsonl)], work / f"speed{rep}", tokenizer=tokenizer, progress=False)
        ours, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
        assert r.tokens == tokens, (r.tokens, tokens)
        pairs.append({"encode_batch_s": limit, "kislurm_s": ours, "ratio": limit / ours,
                      "cpu_ratio": limit_cpu / ours_cpu, "free_s": free, "ratio_with_free": (limit + free) / ours})
    return {"tokens": tokens, "documents": len(texts), "pairs": pairs,
            "median_ratio": statistics.median(p["ratio"] for p in pairs),
            "median_cpu_ratio": statistics.median(p["cpu_ratio"] for p in pairs),
            "median_ratio_with_free": statistics.median(p["ratio_with_free"] for p in pairs),
            "best_encode_batch_tokens_per_s": tokens / min(p["encode_batch_s"] for p in pairs),
            "best_kislurm_tokens_per_s": tokens / min(p["kislurm_s"] for p in pairs)}


def memory(inputs: list[Path], tokenizer: Path, out: Path) -> dict:
    shutil.rmtree(f"{out}.shards", ignore_errors=True)       # a kept shard would be reused, not measured
    cmd = [sys.executable, "-m", "kislurm.cli", "corpus", *map(str, inputs), "--out", str(out), "--tokenizer",
           str(tokenizer), "--keep-shards"]
    secs, peak, line = tree_peak(cmd)
    return {"seconds": secs, "peak_mb": peak, "report": line, "bin_mb": Path(f"{out}.bin").stat().st_size / 2**20}


MERGE = """
import sys, time, numpy as np, psutil
from pathlib import Path
from kislurm.data.corpus import merge_prefixes
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
prefixes = sorted(str(p.with_suffix('')) for p in Path(sys.argv[2]).glob('*/tokens.idx'))
before = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if sys.argv[1] == 'kislurm':
    merge_prefixes(prefixes, sys.argv[3], np.dtype(np.uint16))
else:
    b = IndexedDatasetBuilder(sys.argv[3] + '.bin', dtype=np.uint16)
    for p in prefixes:
        b.add_index(p)
    b.finalize(sys.argv[3] + '.idx')
print(time.perf_counter() - t0, before / 2**20)
"""


def merges(prefix: Path) -> dict:
    """The merge alone, kislurm's streaming one and megatron-core's add_index loop, on the kept shards: its own time,
    and the process's peak RSS against its RSS after the imports."""
    res = {}
    for who in ("kislurm", "megatron"):
        _, peak, out = tree_peak([sys.executable, "-c", MERGE, who, f"{prefix}.shards", f"{prefix}.{who}-merge"])
        secs, before = map(float, out.split()[-2:])
        res[who] = {"seconds": secs, "peak_mb": peak, "after_imports_mb": before, "merge_mb": peak - before}
    a, b = (Path(f"{prefix}.{w}-merge.idx").read_bytes() for w in ("kislurm", "megatron"))
    res["identical_idx"] = a == b
    return res


def long_docs(src: Path, path: Path, chars: int = 4000) -> None:
    """Consecutive documents of `src` joined by spaces into documents of `chars` characters or more."""
    with path.open("w", encoding="utf-8") as f:
        doc: list[str] = []
        for line in src.open(encoding="utf-8"):
            doc.append(json.loads(line)["text"])
            if sum(map(len, doc)) >= chars:
                f.write(json.dumps({"text": " ".join(doc)}) + "\n")
                doc = []
        if doc:
            f.write(json.dumps({"text": " ".join(doc)}) + "\n")


def one_word_docs(path: Path, n: int) -> None:
    words = sorted({w for t in wordnet_documents() for w in t.split(":")[0].split(", ") if " " not in w})
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": words[i % len(words)]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_corpus"))
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: a 16k BPE trained on the corpus")
    ap.add_argument("--scales", default="1,4,16")
    ap.add_argument("--words", type=int, default=2_000_000)
    ap.add_argument("--speed-only", action="store_true", help="only the tokens/s comparison")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    base = work / "wordnet.jsonl"
    write_wordnet_jsonl(base)
    tok = args.tokenizer
    if tok is None:
        tok = work / "wordnet.tokenizer.json"
        if not tok.is_file():
            build_corpus([str(base)], work / "wordnet", vocab_size=16000, progress=False)
    results: dict = {"corpus": {"documents": sum(1 for _ in base.open()), "mb": base.stat().st_size / 2**20}}
    results["speed"] = speed(base, tok, work)
    print(json.dumps({"speed": results["speed"]}), flush=True)
    long = work / "long.jsonl"
    long_docs(base, long)
    results["speed_long"] = speed(long, tok, work)
    print(json.dumps({"speed_long": results["speed_long"]}), flush=True)
    if args.speed_only:
        return
    for k in map(int, args.scales.split(",")):
        copy = work / f"x{k}.jsonl"
        if not copy.is_file():
            copy.write_bytes(base.read_bytes() * k)
        results[f"{k}x"] = m = memory([copy], tok, work / f"out{k}")
        m["merge"] = merges(work / f"out{k}")
        print(json.dumps({f"{k}x": m}), flush=True)
    words = work / "words.jsonl"
    if not words.is_file():
        one_word_docs(words, args.words)
    results["one_word"] = m = memory([words], tok, work / "words")
    m["merge"] = merges(work / "words")
    print(json.dumps({"one_word": m}), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {work / 'results.json'}")


if __name__ == "__main__":
    main()
