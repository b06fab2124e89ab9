"""Downstream scores through lm-evaluation-harness, with kislurm's own scorer as the model (docs/downstream.md).

`KislurmLM` is an `lm_eval.api.model.LM` over a megatron-core GPTModel where it runs (as GPT-NeoX's eval adapter
does it): lm-eval's loglikelihood requests become `kislurm.retention.evaluate.score_continuations`, the batched,
length-sorted, DP-split scorer of the retention probes, so any layout (TP, DP, CPU or GPU) evaluates a cell's model
with no export. Every rank runs lm-eval with the same requests (each tells lm-eval it is rank 0 of 1) and scoring
is the collective: each DP rank scores its share of the batches, and one all-reduce gives every rank every score.

Multiple-choice ties: lm-eval's `acc` takes the argmax of the choices' log-likelihoods, which silently picks the
first of tied choices, where kislurm's probes count a tie as wrong. The adapter counts, per task, the documents
whose two best choices are within TIE_MARGIN and reports them as the task's `ties` metric, so a tie is never broken
unseen: `acc` minus the store's probe accuracy is at most ties / n.

`write_probe_task` turns a cell's probe set into an lm-eval task on local files (no download): one multiple-choice
document per probe, the choices in the store's order, an empty target delimiter (the candidates carry their own
leading space), so lm-eval's `acc` equals the mean of the store's `probe_correct` up to reported ties.

Needs the optional extra: pip install 'kislurm[eval]' (lm-eval, without its torch-bringing extras).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kislurm.data.knowledge import ProbeSet
from kislurm.data.tokenizer import Tokenizer
from kislurm.errors import EvalError
from kislurm.publish import atomic_write_text
from kislurm.retention.evaluate import score_continuations, sequence_limit

PROBE_TASK = "kislurm_probes"
"""The task made from the cell's own probes (write_probe_task); name it in eval.downstream.tasks."""
TEXT_TASK = "kislurm_general_text"
"""The general facts under their held-out templates, never trained on, as text scored by its rolling
log-likelihood (bits per byte, perplexities): lm-eval's wikitext form, on local files (write_text_task)."""
TIE_MARGIN = 1e-5
"""Choices whose log-likelihoods differ by less than this are a tie (counted, never broken silently)."""
METRIC_PREFIX = "downstream/"
"""Store metric names: downstream/TASK/METRIC (TensorBoard groups them under retention/downstream/)."""
INSTALL = "fix: pip install 'kislurm[eval]' (lm-eval) where the cells run"


def require_lm_eval() -> str:
    """lm-eval's version, or one line naming what to install."""
    try:
        import lm_eval  # noqa: F401
        from importlib.metadata import version
    except ImportError:
        raise EvalError(f"downstream evaluation needs lm-eval, which is not installed; {INSTALL}") from None
    return version("lm_eval")


require_lm_eval()
from lm_eval.api.model import LM  # noqa: E402  (after the one-line check above)


class KislurmLM(LM):
    """lm-eval's model interface over kislurm's candidate scorer (collective: every rank of the model calls it)."""

    def __init__(self, model: Any, tokenizer: Tokenizer, batch_size: int = 512):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_length = sequence_limit(model)
        self.ties: collections.Counter[str] = collections.Counter()
        """Per task: documents whose best two choices tie within TIE_MARGIN."""
        self._encoded: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = self.tokenizer.encode(text)
        return ids

    def _pair(self, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
        """Context and continuation tokenized separately (the probes' tokens: a candidate is tokenized on its own,
        its leading space included); an empty context is EOD; a context too long is cut from the left."""
        cont = self._encode(continuation)
        if not cont:
            raise EvalError(f"continuation {continuation!r} has no tokens; fix: give every choice some text")
        if len(cont) > self.max_length:
            raise EvalError(f"a continuation of {len(cont)} tokens exceeds the model's {self.max_length} positions; "
                            "fix: choose a task with shorter targets, or a longer seq_length")
        ctx = self._encode(context) if context else [self.tokenizer.eod]
        ctx = ctx[-(self.max_length + 1 - len(cont)):] or [self.tokenizer.eod]
        return np.asarray(ctx, np.int64), np.asarray(cont, np.int64)

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args) for r in requests]
        scores, greedy, _ = score_continuations(self.model, [p[0] for p in pairs], [p[1] for p in pairs],
                                                self.batch_size)
        self._count_ties(requests, scores)
        return [(float(s), bool(g)) for s, g in zip(scores, greedy)]

    def _count_ties(self, requests: list, scores: np.ndarray) -> None:
        by_doc: dict[tuple, list[float]] = collections.defaultdict(list)
        for r, s in zip(requests, scores):
            by_doc[(r.task_name, r.doc_id)].append(float(s))
        for (task, _), values in by_doc.items():
            if len(values) > 1:
                best = sorted(values, reverse=True)
                if best[0] - best[1] < TIE_MARGIN:
                    self.ties[task] += 1

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        """Whole-text log-likelihood in rolling windows of the model's length (lm-eval's own windowing), EOD first."""
        from lm_eval import utils

        windows, owner = [], []
        for i, r in enumerate(requests):
            tokens = self._encode(r.args[0])
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.tokenizer.eod, max_seq_len=self.max_length, context_len=1)):
                windows.append((np.asarray(ctx or [self.tokenizer.eod], np.int64), np.asarray(cont, np.int64)))
                owner.append(i)
        scores, _, _ = score_continuations(self.model, [w[0] for w in windows], [w[1] for w in windows],
                                           self.batch_size)
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, np.int64), scores)
        return [float(t) for t in totals]

    def generate_until(self, requests: list) -> list[str]:
        raise EvalError("generation tasks (lm-eval's generate_until, e.g. gsm8k) are not supported by kislurm's "
                        "scorer; fix: choose multiple-choice or loglikelihood tasks (arc_easy, piqa, lambada_openai)")


# ----------------------------------------------------------------------------------------------------------------
# The cell's probes as a local lm-eval task


def probe_documents(probes: ProbeSet, tokenizer: Tokenizer) -> list[dict[str, Any]]:
    """One multiple-choice document per probe: the prompt's text, its candidates' texts in the store's order,
    the answer's index. Refused when a text does not tokenize back to the probe's tokens (lm-eval tokenizes text,
    so the scores would be of other sequences)."""
    docs = []
    for p, (prompt, cands) in enumerate(zip(probes.prompt, probes.candidates)):
        query, choices = tokenizer.decode(prompt), [tokenizer.decode(c) for c in cands]
        for text, ids in [(query, prompt), *zip(choices, cands)]:
            if tokenizer.encode(text) != [int(i) for i in ids]:
                raise EvalError(f"probe {p}: {text!r} does not tokenize back to its tokens; fix: use a tokenizer "
                                "whose decode/encode round-trips (byte-level BPE, as kislurm trains)")
        docs.append({"query": query, "choices": choices, "gold": int(probes.answer[p]),
                     "fact": probes.fact_ids[int(probes.fact_index[p])], "heldout": bool(probes.heldout[p])})
    return docs


def write_probe_task(probes: ProbeSet, tokenizer: Tokenizer, folder: Path, name: str = PROBE_TASK) -> Path:
    """Write the probe task (NAME.jsonl and NAME.yaml) into `folder`, each file atomically; returns the YAML."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps(d) + "\n" for d in probe_documents(probes, tokenizer)))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "query",
              "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": "",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0, "source": "kislurm.retention.downstream.write_probe_task"}}
    yaml_path = folder / f"{name}.yaml"
    atomic_write_text(yaml_path, json.dumps(config, indent=1) + "\n")  # JSON is YAML
    return yaml_path


def general_texts(prepared: Any) -> list[str]:
    """Every general fact under each held-out template of its relation (sentences no cell trains on)."""
    from kislurm.data.knowledge import render

    templates = prepared.templates()
    return [render(t, f) for f in prepared.general.facts for t in templates[f.relation].heldout]


def write_text_task(texts: list[str], folder: Path, name: str = TEXT_TASK) -> Path:
    """A loglikelihood_rolling task over `texts` (one document each) in `folder`; returns its YAML."""
    if not texts:
        raise EvalError(f"{name}: no text to score (no held-out templates, or no general facts); fix: drop "
                        f"{name} from the tasks, or give the relations held-out templates")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    atomic_write_text(data, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
              "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
              "doc_to_target": "text", "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity",
                                                                                 "bits_per_byte")],
              "metadata": {"version": 1.0, "source": "kislurm.retention.downstream.write_text_task"}}
    yaml_path = folder / f"{name}.yaml"
    atomic_write_text(yaml_path, json.dumps(config, indent=1) + "\n")
    return yaml_path


def write_local_tasks(tasks: list[str], prepared: Any, probes: ProbeSet, folder: Path) -> None:
    """Write the kislurm tasks named in `tasks` (the cell's probes, the general held-out text) into `folder`."""
    if PROBE_TASK in tasks:
        write_probe_task(probes, prepared.tokenizer, folder)
    if TEXT_TASK in tasks:
        write_text_task(general_texts(prepared), folder)


# ----------------------------------------------------------------------------------------------------------------
# Running tasks


@dataclass(frozen=True)
class DownstreamResult:
    """Scores of one model on some lm-eval tasks, with what identifies them."""

    metrics: dict[str, float]
    """downstream/TASK/METRIC -> value (lm-eval's metrics, `n` documents scored, `ties`)."""
    lm_eval_version: str
    task_hashes: dict[str, str]
    """TASK -> lm-eval's hash of its documents, prompts and targets (as its EvaluationTracker computes it)."""
    limit: int | None = None

    def record(self) -> dict[str, Any]:
        """What the store's meta and downstream.json keep beside the scores."""
        return {"lm_eval_version": self.lm_eval_version, "task_hashes": self.task_hashes, "limit": self.limit}


def metric_name(task: str, metric: str) -> str:
    return f"{METRIC_PREFIX}{task}/{metric}"


def task_manager(tasks: list[str], include: list[Path]) -> tuple[Any, list[str]]:
    """lm-eval's TaskManager over `include` (folders of local task YAMLs) and, only when some task is not local,
    lm-eval's own task folder (scanning it costs seconds); task entries that are YAML paths become their names."""
    from lm_eval.tasks import TaskManager

    folders = [Path(p) for p in include]
    names = []
    for t in tasks:
        path = Path(t)
        if path.suffix in (".yaml", ".yml") and not path.is_file():
            raise EvalError(f"{path}: no such task file; fix: give an existing lm-eval task YAML, or a task name")
        if path.suffix in (".yaml", ".yml"):
            folders.append(path.parent)
            names.append(_yaml_task_name(path))
        else:
            names.append(t)
    local = {p.stem for f in folders for p in Path(f).glob("*.y*ml")}
    manager = TaskManager(include_path=[str(f) for f in dict.fromkeys(folders)] or None,
                          include_defaults=not set(names) <= local)
    return manager, names


def _yaml_task_name(path: Path) -> str:
    import yaml

    try:
        return str((yaml.safe_load(path.read_text()) or {})["task"])
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise EvalError(f"{path}: not an lm-eval task file ({str(exc)[:100]}); fix: give a YAML with a `task:` "
                        "key, or a task name") from None


def load_tasks(tasks: list[str], include: list[Path]) -> dict[str, Any]:
    """lm-eval's loaded tasks (its TaskManager.load), zero-shot; one line naming what is wrong otherwise. Building
    the task index costs about a second: the training loop loads once and scores many times."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files or the cluster's cache, never a download
    manager, names = task_manager(tasks, include)
    try:
        loaded = manager.load(names)
    except (KeyError, ValueError) as exc:
        raise EvalError(f"lm-eval task(s) {', '.join(names)}: {str(exc).splitlines()[0][:200]}; fix: name tasks "
                        "lm-eval knows (lm_eval ls tasks), or give a task YAML path") from None
    missing = sorted(set(names) - set(loaded["tasks"]) - set(loaded.get("groups", {})))
    if missing:
        raise EvalError(f"lm-eval knows no task {', '.join(missing)}; fix: name tasks lm-eval knows, or give a task "
                        "YAML path")
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def run_tasks(model: Any, tokenizer: Tokenizer, tasks: list[str], include: list[Path], limit: int | None = None,
              batch_size: int = 512, loaded: dict[str, Any] | None = None) -> DownstreamResult:
    """Score `model` on lm-eval `tasks` (names, or YAML paths; local task folders in `include`), zero-shot;
    `loaded`: those tasks already loaded (load_tasks).

    A collective: every rank of the model calls it with the same arguments, and every rank gets the result. Global
    RNGs are left alone (lm-eval's evaluate, not simple_evaluate, which reseeds python, numpy and torch)."""
    from lm_eval import evaluator
    from lm_eval.utils import hash_string

    version = require_lm_eval()
    loaded = loaded or load_tasks(tasks, include)
    lm = KislurmLM(model, tokenizer, batch_size)
    out = evaluator.evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=True,
                             verbosity="WARNING")
    metrics: dict[str, float] = {}
    hashes: dict[str, str] = {}
    for task in loaded["tasks"]:
        for key, value in out["results"][task].items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or metric == "sample_len" or not isinstance(value, (int, float)) \
                    or isinstance(value, bool):  # sample_len: the documents, recorded as n
                continue
            metrics[metric_name(task, metric if filt in ("", "none") else f"{metric}:{filt}")] = float(value)
        samples = out.get("samples", {}).get(task, [])
        metrics[metric_name(task, "n")] = float(len(samples))
        metrics[metric_name(task, "ties")] = float(lm.ties.get(task, 0))
        hashes[task] = hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in samples))
    return DownstreamResult(metrics=metrics, lm_eval_version=version, task_hashes=hashes, limit=limit)


def nan_metrics(names: list[str]) -> dict[str, float]:
    """The downstream columns of an evaluation that did not score them (the store keeps one metric set)."""
    return {n: math.nan for n in names}


# ----------------------------------------------------------------------------------------------------------------
# In the training loop (eval.downstream)


class InLoop:
    """eval.downstream for one cell: which evaluations score the tasks, and their scores as store metrics.

    Every N-th evaluation scores (the first and the last always); the others record NaN in the downstream columns,
    since a store keeps one metric set. The scores are appended with the evaluation's record, so a resumed cell
    redoes exactly the evaluations after its checkpoint, downstream scores included: each is recorded once."""

    def __init__(self, cfg: Any, eval_steps: list[int], prepared: Any, probes: ProbeSet, folder: Path,
                 batch_size: int, stored: dict[str, Any] | None = None):
        self.cfg, self.tokenizer, self.batch_size = cfg, prepared.tokenizer, batch_size
        steps = sorted(eval_steps)
        self.due = {s for i, s in enumerate(steps) if i % cfg.every == 0} | {steps[-1]}
        self.folder = Path(folder)
        self.tasks = list(cfg.tasks)
        write_local_tasks(self.tasks, prepared, probes, self.folder)
        self._loaded: dict[str, Any] | None = None
        self.record: dict[str, Any] = dict(stored or {})
        """What the store's meta["downstream"] holds: tasks, lm-eval version, task hashes, limit, metric names."""

    def scores(self, model: Any, step: int) -> dict[str, float]:
        """The downstream metrics of the evaluation at `step` (a collective when due: every rank calls it)."""
        if step not in self.due:
            return nan_metrics(self.record.get("metrics", []))
        self._loaded = self._loaded or load_tasks(self.tasks, [self.folder])
        result = run_tasks(model, self.tokenizer, self.tasks, [self.folder], self.cfg.limit, self.batch_size,
                           self._loaded)
        self.record = {"tasks": self.tasks, "every": self.cfg.every, **result.record(),
                       "metrics": sorted(result.metrics)}
        return result.metrics
