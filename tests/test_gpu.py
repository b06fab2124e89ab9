"""The GPU path: bf16, megatron's distributed optimizer, NCCL, checkpoint-resume and a whole cell on one GPU.

Skipped where no CUDA GPU is visible (CI, laptops); run on a GPU node with `python -m pytest tests/test_gpu.py`.
The CPU side of the same contract (a GPU preset on a machine without GPUs is a one-line error) is tested in
tests/test_train.py, which runs everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kislurm.train import distributed
from kislurm.plan.config import DataConfig, EvalConfig
from kislurm.plan.loader import load_config
from kislurm.plan.presets import ModelPreset
from kislurm.plan.training import TrainConfig
from kislurm.train.model import have_transformer_engine
from kislurm.plan.grid import Cell, expand
from kislurm.retention.store import read_cell

from test_train import SEQ, VOCAB, SyntheticLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parents[1]
GPU_TINY = ModelPreset(num_layers=2, hidden_size=128, num_attention_heads=4, seq_length=SEQ, device="gpu")


def gpu_cell(steps: int, **train: object) -> Cell:
    tc = TrainConfig(micro_batch_size=8, global_batch_size=16, lr=3e-3, warmup_frac=0.1, log_interval=5, **train)
    return Cell(size="gpu-tiny", ratio=0.5, tokens=steps * 16 * SEQ, seed=0, model=GPU_TINY, data=DataConfig(),
                train=tc, eval=EvalConfig())


@pytest.fixture(scope="module")
def ctx():
    c = distributed.init_model_parallel(tp=1, device="gpu")
    yield c
    distributed.teardown(c)


def test_gpu_trains_bf16_with_megatrons_distributed_optimizer(ctx, tmp_path):
    from kislurm.train.trainer import Trainer

    cell = gpu_cell(40)
    t = Trainer(cell, SyntheticLM(cell.n_samples), tmp_path, VOCAB, ctx, log=lambda _m: None)
    assert ctx.device.type == "cuda" and t.precision == "bf16"
    assert next(t.model.parameters()).dtype == torch.bfloat16
    inner = getattr(t.optimizer, "optimizer", t.optimizer)  # TorchAdamCheckpointFix wraps it without TE/Apex
    assert any(type(o).__name__ == "DistributedOptimizer" for o in getattr(inner, "chained_optimizers", [inner]))
    out = t.train_steps(40)
    assert 0.0 < out["mfu"] < 1.0 and out["tokens_per_s"] > 0
    assert sum(t.losses[-5:]) / 5 < 0.7 * sum(t.losses[:5]) / 5, "loss should fall on the learnable sequences"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_gpu_checkpoint_resume_continues_the_same_run(ctx, tmp_path, async_save):
    """Weights, distributed-optimizer state, step and data position all come back: the resumed run's losses are
    the uninterrupted run's, from a routine (dp_reshardable) checkpoint written synchronously or asynchronously,
    with DP communication overlapped. Attention runs on torch's math kernel here, as the fused ones' backward
    passes are not bitwise reproducible from run to run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kislurm.train import checkpoint
    from kislurm.train.trainer import Trainer

    cell = gpu_cell(20, async_save=async_save, keep_final="full")
    data = SyntheticLM(cell.n_samples)
    with sdpa_kernel(SDPBackend.MATH):
        straight = Trainer(cell, data, tmp_path / "a", VOCAB, ctx, log=lambda _m: None)
        straight.train_steps(20)
        first = Trainer(cell, data, tmp_path / "b", VOCAB, ctx, log=lambda _m: None)
        assert straight.ddp.ddp_config.overlap_grad_reduce and straight.ddp.ddp_config.overlap_param_gather
        first.train_steps(10)
        first.save_checkpoint()
        first.close()  # an asynchronous save is published here
        assert checkpoint.find_latest(tmp_path / "b").meta["optimizer_format"] == checkpoint.ROUTINE_FORMAT
        del first
        resumed = Trainer(cell, data, tmp_path / "b", VOCAB, ctx, log=lambda _m: None)
        assert resumed.step == 10
        resumed.train_steps(10)
        resumed.finish()  # keep_final: full, the reshardable format
    diff = max(abs(a - b) for a, b in zip(straight.losses, resumed.losses))
    assert diff < 1e-5, f"resumed losses differ by {diff}:\n{straight.losses}\n{resumed.losses}"
    final = checkpoint.find_latest(tmp_path / "b")
    assert final.step == 20 and final.meta["optimizer_format"] == checkpoint.FINAL_FORMAT


def test_layers_are_local_unless_transformer_engine_is_asked_for(ctx):
    import dataclasses

    from kislurm.plan.config import ConfigError
    from kislurm.train.model import build_model

    model = build_model(GPU_TINY, VOCAB, 0.02, "bf16")  # default transformer_impl: local, TE installed or not
    names = {type(m).__name__ for m in model.modules()}
    assert "SDPAttention" in names and not any(n.startswith("TE") for n in names), names
    assert next(model.parameters()).is_cuda
    te = dataclasses.replace(GPU_TINY, transformer_impl="transformer_engine")
    if have_transformer_engine():
        te_names = {type(m).__name__ for m in build_model(te, VOCAB, 0.02, "bf16").modules()}
        assert any(n.startswith("TE") for n in te_names), te_names
    else:
        with pytest.raises(ConfigError, match="transformer_impl: local"):
            build_model(te, VOCAB, 0.02, "bf16")


def test_whole_gpu_cell_through_submitit(tmp_path):
    """plan -> data -> train -> evaluate -> store on the GPU, through submitit's local executor, MFU recorded."""
    from kislurm.errors import CellsFailed
    from kislurm.orchestrate.run import submit_run

    tiny = {k: getattr(GPU_TINY, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "device")}
    cfg = load_config(REPO / "configs" / "tiny.yaml", {
        "output_root": str(tmp_path), "models.gpu-tiny": tiny, "grid.sizes": ["gpu-tiny"], "grid.ratios": [0.5],
        "executor.gpus_per_node": 1, "executor.array_parallelism": 1})
    cells = expand(cfg)
    try:
        run = submit_run(cfg, cells)
    except CellsFailed:
        logs = sorted(tmp_path.glob("**/*_log.*")) + sorted(tmp_path.glob("**/log.txt"))
        pytest.fail("the GPU cell failed:\n" + "\n".join(p.read_text()[-3000:] for p in logs))
    rec = read_cell(run.cell(cells[0].name).store)
    assert rec.complete and list(rec.step) == cells[0].eval_steps
    assert all(0.0 < e["mfu"] < 1.0 for e in rec.meta["throughput"]), rec.meta["throughput"]
    assert rec.meta["config"]["layout"]["device"] == "gpu"


def test_cpu_shims_stay_off_and_fused_attention_matches_megatrons(ctx):
    """Where CUDA is present the CPU shims do nothing, and the fused core attention used without Transformer
    Engine computes what megatron's own DotProductAttention computes, on the GPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from kislurm.train import cpu_shims
    from kislurm.train.model import SDPAttention, transformer_config

    assert cpu_shims.apply_cpu_shims() is False and not cpu_shims.shims_applied()
    spec = get_gpt_layer_local_spec()
    ours = get_gpt_layer_local_spec()
    ours.submodules.self_attention.submodules.core_attention = SDPAttention

    def build(s):
        distributed.seed_all(3)
        return GPTModel(transformer_config(GPU_TINY, 0.02, "fp32"), s, 128, SEQ,
                        share_embeddings_and_output_weights=True).cuda()

    a_model, b_model = build(ours), build(spec)
    tokens = torch.randint(0, 128, (4, SEQ), device="cuda")
    pos = torch.arange(SEQ, device="cuda").expand(4, SEQ)
    a, b = a_model(tokens, pos, None), b_model(tokens, pos, None)
    assert (a - b).abs().max() < 1e-3, float((a - b).abs().max())


def test_llama_1_3b_preflight_at_tp1_on_one_gpu(tmp_path):
    """The preflight of the Llama-style 1.3B at TP=1 on one GPU (bench_gpu.py's batch: micro 8, global 32):
    resume exact under the math attention kernel, MFU and the same-job plain-PyTorch ratio recorded. Not yet run
    on a GPU (written without one)."""
    from kislurm.plan.loader import config_from_dict, config_to_dict
    from kislurm.plan.presets import BUILTIN_PRESETS
    from kislurm.cluster.preflight import distinct_layouts, run_preflight, summary_line

    preset = {**config_to_dict(BUILTIN_PRESETS["1.3B-llama"]), "tensor_parallel": 1, "data_parallel": 1}
    cfg = config_from_dict({"output_root": str(tmp_path), "grid": {"sizes": ["llama"], "ratios": [0.5]},
                            "models": {"llama": preset}, "train": {"micro_batch_size": 8, "global_batch_size": 32},
                            "executor": {"gpus_per_node": 1, "array_parallelism": 1}})
    [report] = run_preflight(cfg, distinct_layouts(cfg, expand(cfg)), steps=6, folder=tmp_path / "pf")
    print(summary_line(report))
    assert report["passed"], report
    assert report["checks"]["tp_matches_tp1"]["ok"] is None  # TP=1: nothing to compare
    assert 0.1 < report["mfu"] < 1.0
    base = report["baseline"]  # the plain-PyTorch GPT of the same shape, same job (kislurm.train.baseline)
    assert base["tokens_per_s"] > 0 and base["ratio"] > 0 and 0.0 < base["mfu"] < 1.0, base
