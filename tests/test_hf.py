"""HuggingFace both ways (kislurm.plan.hf, kislurm.cluster.export): every built-in preset maps to its stock
transformers class with equal logits; a real cell trained at TP=2 exports (resharded to TP=1 by dist_checkpointing)
to a folder transformers opens offline, whose answers to the cell's probes are the store's; random Llama and GPT-2
models import with equal logits and export back bit-identical; bad input is refused in one line, nothing written."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kislurm.cli import main
from kislurm.orchestrate.run import submit_run
from kislurm.cluster.status import write_status
from kislurm.data.prepare import cell_probes, load_prepared
from kislurm.plan.config import ConfigError
from kislurm.plan.loader import load_config
from kislurm.plan.presets import BUILTIN_PRESETS, ModelPreset
from kislurm.plan.grid import expand
from kislurm.retention.evaluate import evaluate_retention
from kislurm.retention.store import read_cell
from kislurm.plan import hf
from kislurm.train import distributed
from kislurm.train.model import build_model

transformers = pytest.importorskip("transformers")  # the extra kislurm[hf]; tools/dev test installs it
XDIST_GROUP = "hf"  # one worker trains the module's cells once (tests/conftest.py; the Slurm test: its cluster's)

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4
LLAMA_M = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_query_groups": 2, "seq_length": 32,
           "position_embedding": "rope", "activation": "swiglu", "normalization": "rmsnorm", "tie_embeddings": False,
           "tensor_parallel": 2}


@pytest.fixture(scope="module")
def tp1():
    distributed.init_model_parallel(1, 1, "cpu")
    distributed.seed_all(0)  # megatron's RNG tracker: a test run alone builds and scores models too
    yield
    distributed.teardown()


def _tokens(vocab: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(1))


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    n = tokens.shape[1]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]
    with torch.no_grad():
        return model.eval()(tokens, torch.arange(n)[None].expand_as(tokens), mask)


def tiny(preset: ModelPreset) -> ModelPreset:
    """The preset's architecture at a tiny width (layout and device as a one-process CPU model)."""
    groups = 2 if preset.num_query_groups is not None else None
    return hf.on_cpu_tp1(dataclasses.replace(preset, tensor_parallel=1, device="cpu", num_layers=2, hidden_size=32,
                                             num_attention_heads=4, num_query_groups=groups, seq_length=32))


@pytest.mark.parametrize("name", sorted(BUILTIN_PRESETS))
def test_every_builtin_preset_exports_with_equal_logits(tp1, name):
    preset = tiny(BUILTIN_PRESETS[name])
    distributed.seed_all(0)
    model = build_model(preset, vocab_size=100, init_std=0.2, precision="fp32")
    with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a misplaced one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tokens = _tokens(100)
    ours = megatron_logits(model, tokens)[..., :100]  # the padding rows are trimmed in the export
    theirs = hf.hf_model(preset, model.state_dict(), 100, eos=0, pad=1)
    assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[hf.family(preset)]
    with torch.no_grad():
        diff = (theirs(tokens).logits - ours).abs().max().item()
    assert diff <= TOL and ours.abs().max().item() > 1.0, (name, diff)


@pytest.mark.parametrize("change,named", [
    ({"position_embedding": "rope"}, "position_embedding: rope, activation: gelu, normalization: layernorm"),
    ({"normalization": "rmsnorm"}, "normalization: rmsnorm"),
    ({"num_query_groups": 2}, "num_query_groups 2"),
    ({"linear_bias": False}, "linear_bias: false"),
])
def test_combination_no_stock_class_expresses_is_refused_in_one_line(change, named):
    preset = dataclasses.replace(BUILTIN_PRESETS["cpu-s"], **change)
    with pytest.raises(hf.HFError, match=named) as err:
        hf.family(preset)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------------
# A real cell trained at TP=2, exported


@pytest.fixture(scope="module")
def tp2_cell(tmp_path_factory):
    """One Llama-style cell (GQA, untied) trained at TP=2 through the local executor, keeping its full final
    checkpoint (the init_from cell below keeps weights only); small knowledge bases and a high learning rate so that
    greedy answers are a mix of right and wrong (the probe comparison can fail)."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "output_root": str(root), "grid.sizes": ["m"], "grid.ratios": [0.5], "grid.token_budgets": [20000],
        "train.eval_interval": 100, "train.lr": 1e-2, "train.keep_final": "full", "executor.array_parallelism": 1,
        "data.knowledge": {"entities": 6, "relations": 1, "values_per_relation": 10},
        "data.general": {"entities": 6, "relations": 1, "values_per_relation": 10}, "models.m": LLAMA_M})
    (cell,) = expand(cfg)
    run = submit_run(cfg, [cell])
    out = root / "export"
    result = CliRunner().invoke(main, ["export", str(run.root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return run, cell, out / cell.cell_id


def test_tp2_cell_exports_a_folder_transformers_opens(tp2_cell):
    run, cell, folder = tp2_cell
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    prepared = load_prepared(cell.data, run.data, cell.model.seq_length)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
    assert model.config.vocab_size == len(tok) == prepared.tokenizer.vocab_size  # padding rows trimmed
    assert tok.eos_token_id == prepared.tokenizer.eod and tok.eos_token == "<|endoftext|>"
    text = "some general text"
    assert tok(text)["input_ids"] == prepared.tokenizer.encode(text)
    meta = json.loads((folder / "kislurm.json").read_text())
    rec = read_cell(run.cell(cell.name).store, matrix=False)
    assert (meta["cell_id"], meta["size"], meta["ratio"], meta["control"], meta["seed"]) == \
        (cell.cell_id, "m", 0.5, "infusion", 0)
    assert meta["metrics"] == {k: float(v[-1]) for k, v in rec.metrics.items()}
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_tp2_export_logits_equal_the_resharded_megatron_model(tp2_cell, tp1):
    from kislurm.cluster.export import megatron_weights
    from kislurm.train import checkpoint

    run, cell, folder = tp2_cell
    vocab = load_prepared(cell.data, run.data, cell.model.seq_length).tokenizer.vocab_size
    preset = hf.on_cpu_tp1(cell.model)
    sd, meta = megatron_weights(preset, vocab, checkpoint.find_latest(run.cell(cell.name).checkpoints).path)
    assert meta["layout"]["tp"] == 2 and meta["kind"] == "full"  # written at TP=2 with its optimizer, read at TP=1
    model = build_model(preset, vocab, 0.02, "fp32")
    model.load_state_dict(sd)
    tokens = _tokens(vocab)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        diff = (theirs(tokens).logits - megatron_logits(model, tokens)[..., :vocab]).abs().max().item()
    assert diff <= TOL
    # the resharded model is the one that trained at TP=2: it scores the probes as the store recorded
    probes = cell_probes(load_prepared(cell.data, run.data, cell.model.seq_length), cell)
    again = evaluate_retention(model, probes, batch_size=64).metrics
    stored = read_cell(run.cell(cell.name).store, matrix=False).metrics
    assert all(abs(again[k] - stored[k][-1]) <= TOL or np.isnan(stored[k][-1]) for k in stored)


def test_a_bf16_checkpoint_loads_into_the_fp32_export_model_exactly(tp1, tmp_path):
    """GPU cells keep bf16 weights (megatron's Float16Module, same checkpoint keys): read at TP=1 in fp32, exact."""
    from kislurm.cluster.export import megatron_weights
    from kislurm.train import checkpoint

    preset = BUILTIN_PRESETS["cpu-s-llama"]
    distributed.seed_all(0)
    model = build_model(preset, 100, 0.02, "bf16")
    assert type(model).__name__ == "Float16Module" and next(model.parameters()).dtype == torch.bfloat16
    checkpoint.save(tmp_path, 1, model, None, "bf16-cell", {}, folder=checkpoint.FINAL_DIR)
    sd, meta = megatron_weights(hf.on_cpu_tp1(preset), 100, tmp_path / checkpoint.FINAL_DIR)
    ref = hf.to_hf(model.module.state_dict(), preset, 100)
    assert meta["cell_id"] == "bf16-cell"
    assert all(v.dtype == torch.float32 and torch.equal(v, ref[k].float())
               for k, v in hf.to_hf(sd, preset, 100).items())


def test_tp2_export_answers_the_probes_as_the_store_recorded(tp2_cell):
    """Scored and decoded by transformers alone, multiple choice and greedy exact match equal the store's last
    evaluation (made by the TP=2 model during training). Log-probabilities are not compared: megatron normalises
    over the padded vocabulary, the export over len(tokenizer) (the padding rows are trimmed)."""
    run, cell, folder = tp2_cell
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    probes = cell_probes(load_prepared(cell.data, run.data, cell.model.seq_length), cell)
    rec = read_cell(run.cell(cell.name).store)
    scores = np.zeros((len(probes.prompt), probes.n_choices))
    exact = np.zeros(len(probes.prompt), dtype=bool)
    with torch.no_grad():
        for p, prompt in enumerate(probes.prompt):
            for c, cand in enumerate(probes.candidates[p]):
                ids = torch.from_numpy(np.concatenate([prompt, cand]).astype(np.int64))[None]
                logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].double(), dim=-1)
                scores[p, c] = logp.gather(1, ids[0, len(prompt):, None]).sum().item()
            answer = probes.candidates[p][probes.answer[p]]
            out = model.generate(torch.from_numpy(prompt.astype(np.int64))[None], max_new_tokens=len(answer),
                                 do_sample=False, pad_token_id=model.config.pad_token_id)
            exact[p] = out[0, len(prompt):].tolist() == list(answer)
    best = scores.argmax(1) == probes.answer
    second = np.sort(scores, 1)[:, -2] < scores.max(1)
    assert np.array_equal(best & second, rec.probe_correct[-1].astype(bool))
    assert np.array_equal(exact, rec.probe_exact[-1].astype(bool))
    assert 0 < exact.sum() < len(exact)  # a mix: the comparison could have failed either way


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written


def _copy_run(tp2_cell, tmp_path: Path):
    run, cell, folder = tp2_cell
    copy = tmp_path / run.root.name
    shutil.copytree(run.root, copy, ignore=shutil.ignore_patterns("submitit"))
    return copy, run.cell(cell.name).root.name, cell


def _refused(args: list[str], out: Path, *match: str) -> None:
    before = sorted(str(p) for p in out.rglob("*")) if out.exists() else None
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and "fix:" in line and all(m in line for m in match), line
    after = sorted(str(p) for p in out.rglob("*")) if out.exists() else None
    assert after == before


def test_export_refuses_a_cell_that_kept_no_weights(tp2_cell, tmp_path):
    copy, name, cell = _copy_run(tp2_cell, tmp_path)
    shutil.rmtree(copy / "cells" / name / "checkpoints")  # what train.keep_final: none leaves of a done cell
    out = tmp_path / "out"
    _refused(["export", str(copy), "--out", str(out), "--cells", cell.cell_id], out, name, "kept no weights")
    _refused(["export", str(copy), "--out", str(out)], out, "no cell is done with kept weights")
    assert not out.exists()


def test_export_refuses_a_cell_still_running(tp2_cell, tmp_path):
    from kislurm.paths import CellPaths

    copy, name, cell = _copy_run(tp2_cell, tmp_path)
    paths = CellPaths(copy / "cells" / name)
    paths.store.unlink()
    write_status(paths, "RUNNING", step=3)  # this process's pid: alive
    out = tmp_path / "out"
    _refused(["export", str(copy), "--out", str(out), "--cells", "m_*"], out, name, "is running, not done")


def test_export_refuses_a_folder_holding_another_cell(tp2_cell, tmp_path):
    run, cell, folder = tp2_cell
    out = tmp_path / "out"
    (out / cell.cell_id).mkdir(parents=True)
    (out / cell.cell_id / "kislurm.json").write_text(json.dumps({"cell_id": "0123456789", "run": "/elsewhere"}))
    _refused(["export", str(run.root), "--out", str(out)], out, "already holds cell 0123456789")
    _refused(["export", str(run.root), "--out", str(folder)], folder, "is itself the export of cell")


def test_export_without_the_extra_says_what_to_install(tp2_cell, tmp_path):
    run, cell, _ = tp2_cell
    out = tmp_path / "out"
    code = ("import sys; sys.modules['transformers'] = None; from kislurm.cli import main; "
            f"main(['export', {str(run.root)!r}, '--out', {str(out)!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kislurm: error: HuggingFace export and import need transformers and safetensors (transformers is "
        "missing); fix: pip install 'kislurm[hf]'")
    assert not out.exists()


@pytest.mark.slurm
def test_on_slurm_each_cell_exports_as_a_cpu_array_task(tp2_cell, slurm_cluster, tmp_path):
    import yaml
    from safetensors.torch import load_file

    copy, name, cell = _copy_run(tp2_cell, tmp_path)
    spec = yaml.safe_load((copy / "config.yaml").read_text())
    spec.setdefault("executor", {}).update(cluster="slurm", time="10", prepare_cpus=1)  # ids do not change
    (copy / "config.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", str(copy), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "submitted 1 export task(s) as Slurm array" in result.output
    assert list((copy / "submitit" / "export").rglob("*_result.pkl"))  # ran as a Slurm job, through submitit
    here, there = load_file(tp2_cell[2] / "model.safetensors"), load_file(out / cell.cell_id / "model.safetensors")
    assert set(here) == set(there) and all(torch.equal(here[k], there[k]) for k in here)


# ----------------------------------------------------------------------------------------------------------------------
# Import: random transformers models (built from configs here, nothing downloaded) into megatron and back


def _llama() -> object:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    return transformers.LlamaForCausalLM(config)


def _gpt2() -> object:
    config = transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                     activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.parametrize("make", [_llama, _gpt2], ids=["llama", "gpt2"])
def test_random_hf_model_imports_with_equal_logits_and_exports_back_bit_identical(tp1, tmp_path, make):
    torch.manual_seed(0)
    original = make().eval()
    with torch.no_grad():  # norms and biases away from their init, so a misplaced one shows
        for p in original.parameters():
            p.add_(0.05 * torch.randn_like(p))
    original.save_pretrained(tmp_path / "base")
    preset, hf_sd = hf.read_hf_folder(str(tmp_path / "base"))
    model = build_model(preset, vocab_size=100, init_std=0.02, precision="fp32")
    hf.load_hf_weights(model, hf_sd, preset)
    tokens = _tokens(100)
    with torch.no_grad():
        diff = (megatron_logits(model, tokens)[..., :100] - original(tokens).logits).abs().max().item()
    assert diff <= TOL
    back = hf.to_hf(model.state_dict(), preset, 100)
    reference = original.state_dict()
    names = set(reference) - ({"lm_head.weight"} if preset.tie_embeddings else set())
    assert set(back) == names
    assert all(torch.equal(back[k], reference[k]) for k in names)


def test_import_refuses_an_unsupported_architecture(tmp_path):
    gpt2 = _gpt2()
    gpt2.config.activation_function = "gelu_new"  # GPT-2's tanh approximation: megatron's GeLU is exact
    gpt2.save_pretrained(tmp_path / "tanh")
    with pytest.raises(hf.HFError, match="gelu_new") as err:
        hf.read_hf_folder(str(tmp_path / "tanh"))
    assert "\n" not in str(err.value)
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "mistral")
    with pytest.raises(hf.HFError, match="model_type 'mistral' is not supported"):
        hf.read_hf_folder(str(tmp_path / "mistral"))


# ----------------------------------------------------------------------------------------------------------------------
# init_from: a one-cell grid that starts from a base model (the TP=2 cell's export)


def _based_config(root: Path, base: Path, **more):
    return load_config(REPO / "configs" / "tiny.yaml", {
        "output_root": str(root), "grid.sizes": ["b"], "grid.ratios": [0.5], "grid.token_budgets": [5120],
        "train.eval_interval": 100, "executor.array_parallelism": 1,
        "data.knowledge": {"entities": 6, "relations": 1, "values_per_relation": 10},
        "data.general": {"entities": 6, "relations": 1, "values_per_relation": 10},
        "models.b": {"init_from": str(base)}, **more})


def test_init_from_cell_starts_from_the_base_and_records_step_0(tp2_cell, tmp_path, tp1):
    base = tp2_cell[2]
    cfg = _based_config(tmp_path, base)
    (cell,) = expand(cfg)
    assert (cell.model.hidden_size, cell.model.num_query_groups, cell.model.position_embedding,
            cell.model.tie_embeddings, cell.model.seq_length) == (32, 2, "rope", False, 32)  # from config.json
    assert cfg.data.tokenizer == str(base / "tokenizer.json")
    run = submit_run(cfg, [cell])
    rec = read_cell(run.cell(cell.name).store)
    assert rec.complete and list(rec.step) == [0, cell.steps] == cell.eval_steps
    assert rec.tokens[0] == 0 and np.isnan(rec.train_loss[0]) and np.isfinite(rec.train_loss[1])
    # step 0 is the base itself, before any step: evaluating the base here gives the stored row
    prepared = load_prepared(cell.data, run.data, cell.model.seq_length)
    model = build_model(hf.on_cpu_tp1(cell.model), prepared.tokenizer.vocab_size, 0.02, "fp32")
    hf.init_from_base(model, cell.model)
    known = evaluate_retention(model, cell_probes(prepared, cell), batch_size=64)
    assert np.array_equal(known.probe_correct, rec.probe_correct[0].astype(bool))
    assert all(abs(known.metrics[k] - rec.metrics[k][0]) <= TOL for k in rec.metrics if np.isfinite(rec.metrics[k][0]))
    assert rec.metrics["infused_acc"][0] > 0.5  # the base (trained on these facts) knows them: not a random start
    # kept as CKPT/final (keep_final: weights), it exports too
    result = CliRunner().invoke(main, ["export", str(run.root), "--out", str(tmp_path / "export")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "export" / cell.cell_id / "kislurm.json").read_text())
    assert meta["checkpoint"].endswith("/final") and meta["checkpoint_step"] == cell.steps


def test_init_from_refuses_a_tokenizer_not_the_base_s(tp2_cell, tmp_path):
    base = tp2_cell[2]
    spec = json.loads((base / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": len(spec["model"]["vocab"]) + 5,
                                 "content": "<|other|>"})
    (tmp_path / "other.json").write_text(json.dumps(spec))
    result = CliRunner().invoke(main, ["prepare", str(REPO / "configs" / "tiny.yaml"), "--set",
                                       f"output_root={tmp_path / 'runs'}", "--set", "grid.sizes=[b]", "--set",
                                       f"models.b={{init_from: {base}}}", "--set",
                                       f"data.tokenizer={tmp_path / 'other.json'}"])
    assert result.exit_code == 2
    line = result.output.strip().splitlines()[-1]  # after the progress bar's
    assert line.startswith("kislurm: error: data.tokenizer") and "differs from the base's" in line, line
    assert not (tmp_path / "runs").exists()


def test_init_from_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    config = transformers.MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)
    config.save_pretrained(tmp_path / "mistral")
    with pytest.raises(ConfigError, match=r"models\.b\.init_from: model_type 'mistral' is not supported") as err:
        load_config(REPO / "configs" / "tiny.yaml", {"grid.sizes": ["b"], "models.b": {
            "init_from": str(tmp_path / "mistral")}})
    assert "\n" not in str(err.value)
    _llama().config.save_pretrained(tmp_path / "llama")
    with pytest.raises(ConfigError, match="which gives hidden_size 32; fix: remove hidden_size"):
        load_config(REPO / "configs" / "tiny.yaml", {"grid.sizes": ["b"], "models.b": {
            "init_from": str(tmp_path / "llama"), "hidden_size": 64}})
