"""Model builder and CPU shims against the installed megatron-core (real GPTModel, real gloo group)."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from kislurm.train import cpu_shims, distributed
from kislurm.plan.presets import BUILTIN_PRESETS, ModelPreset
from kislurm.train.model import build_model, count_parameters, padded_vocab_size

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tp1():
    ctx = distributed.init_model_parallel(tp=1)
    yield ctx
    distributed.teardown(ctx)


def _batch(vocab: int, b: int, s: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g), torch.arange(s).expand(b, s)


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path: the shims are off where CUDA is present "
                              "(tests/test_gpu.py checks that)")


@cpu_only
def test_shims_are_idempotent_and_in_effect(tp1):
    assert cpu_shims.apply_cpu_shims() is True
    assert cpu_shims.apply_cpu_shims() is True
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA enabled"
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    assert isinstance(get_cuda_rng_tracker(), cpu_shims.CpuRNGStatesTracker)


@cpu_only
def test_each_shim_is_still_needed():
    """Fails when a megatron upgrade makes a shim unnecessary (then delete that shim)."""
    cpu_shims.apply_cpu_shims()
    originals = cpu_shims._ORIGINALS
    with pytest.raises((AssertionError, RuntimeError)):
        originals["current_device"]()
    with pytest.raises((AssertionError, RuntimeError)):
        originals["get_default_causal_mask"](4)
    with pytest.raises((AssertionError, RuntimeError)):
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

        CudaRNGStatesTracker().add("x", 1)


def test_cpu_rng_tracker_forks_and_restores():
    t = cpu_shims.CpuRNGStatesTracker()
    t.add("a", 7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with t.fork("a"):
        x1 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with t.fork("a"):
        x2 = torch.rand(3)
    assert not torch.equal(x1, x2)  # the stream advanced
    assert torch.equal(x1, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    with pytest.raises(Exception, match="already exists"):
        t.add("a", 8)


@pytest.mark.parametrize("name", [n for n, p in BUILTIN_PRESETS.items() if p.device == "cpu"])
def test_param_counts_match_real_model(tp1, name):
    preset = BUILTIN_PRESETS[name]
    distributed.seed_all(0)
    model = build_model(preset, vocab_size=500, init_std=0.02, precision="auto")
    assert count_parameters(model) == preset.param_counts(padded_vocab_size(500))


def test_param_counts_match_for_explicit_ffn_and_longer_sequences(tp1):
    preset = ModelPreset(num_layers=3, hidden_size=40, num_attention_heads=5, ffn_hidden_size=72, seq_length=48)
    model = build_model(preset, vocab_size=300, init_std=0.02, precision="fp32")
    counts = count_parameters(model)
    assert counts == preset.param_counts(padded_vocab_size(300))
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # TP=1: every tensor is whole


ARCHITECTURES = list(itertools.product(["learned", "rope"], ["gelu", "swiglu"], ["layernorm", "rmsnorm"], [None, 2],
                                       [True, False]))


@pytest.mark.parametrize("pos,act,norm,groups,tie", ARCHITECTURES, ids=["-".join(map(str, a)) for a in ARCHITECTURES])
def test_param_formula_matches_built_model_for_every_architecture(tp1, pos, act, norm, groups, tie):
    """ModelPreset.param_counts (the one formula) against megatron's own GPTModel, every option combination."""
    preset = ModelPreset(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, position_embedding=pos,
                         activation=act, normalization=norm, num_query_groups=groups, tie_embeddings=tie)
    distributed.seed_all(0)
    model = build_model(preset, vocab_size=100, init_std=0.02, precision="fp32")
    assert count_parameters(model) == preset.param_counts(padded_vocab_size(100))
    # the options reached megatron: norm class, gated MLP width, positions, K/V width, output layer
    layer = model.decoder.layers[0]
    assert type(layer.input_layernorm) is (torch.nn.RMSNorm if norm == "rmsnorm" else torch.nn.LayerNorm)
    assert layer.mlp.linear_fc1.weight.shape[0] == preset.ffn * (2 if act == "swiglu" else 1)
    assert hasattr(model, "rotary_pos_emb") == (pos == "rope")
    assert hasattr(model.embedding, "position_embeddings") == (pos == "learned")
    assert layer.self_attention.linear_qkv.weight.shape[0] == 32 + 2 * (groups or 4) * 8
    assert (model.output_layer.weight is None) == tie  # tied: the output layer reads the embedding's weight
    tokens, pos_ids = _batch(100, 2, 16)
    loss = model(tokens, pos_ids, None, labels=tokens)
    assert loss.shape == (2, 16) and abs(loss.mean().item() - math.log(128)) < 1.0  # near chance at init


def test_swiglu_default_width_follows_llama():
    llama7b = ModelPreset(num_layers=32, hidden_size=4096, num_attention_heads=32, activation="swiglu")
    assert llama7b.ffn == 11008  # Llama 2 7B's MLP width
    assert ModelPreset(num_layers=1, hidden_size=32, num_attention_heads=4, activation="swiglu").ffn == 88
    assert ModelPreset(num_layers=1, hidden_size=32, num_attention_heads=4).ffn == 128


def test_vocab_padding():
    assert padded_vocab_size(500) == 512
    assert padded_vocab_size(512) == 512
    assert padded_vocab_size(50257) == 50304


def test_forward_loss_and_logits(tp1):
    preset = BUILTIN_PRESETS["cpu-s"]
    distributed.seed_all(1)
    model = build_model(preset, vocab_size=500, init_std=0.02, precision="fp32")
    tokens, pos = _batch(500, 4, preset.seq_length)
    loss = model(tokens, pos, None, labels=tokens)
    assert loss.shape == (4, preset.seq_length)
    assert abs(loss.mean().item() - torch.log(torch.tensor(512.0)).item()) < 0.5  # near chance at init
    logits = model(tokens, pos, None)
    assert logits.shape == (4, preset.seq_length, 512)
    # causal: changing the last token leaves earlier positions' logits unchanged
    t2 = tokens.clone()
    t2[:, -1] = (t2[:, -1] + 1) % 500
    assert torch.allclose(model(t2, pos, None)[:, :-1], logits[:, :-1])


def test_same_seed_same_model_other_seed_differs(tp1):
    preset = BUILTIN_PRESETS["cpu-xxs"]
    distributed.seed_all(3)
    a = build_model(preset, 200, 0.02, "fp32").state_dict()
    distributed.seed_all(3)
    b = build_model(preset, 200, 0.02, "fp32").state_dict()
    distributed.seed_all(4)
    c = build_model(preset, 200, 0.02, "fp32").state_dict()
    keys = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(a[k], b[k]) for k in keys)
    assert not all(torch.equal(a[k], c[k]) for k in keys)


def test_init_std_is_applied(tp1):
    preset = dataclasses.replace(BUILTIN_PRESETS["cpu-l"])
    distributed.seed_all(0)
    model = build_model(preset, 512, init_std=0.05, precision="fp32")
    w = model.embedding.word_embeddings.weight
    assert abs(w.std().item() - 0.05) < 0.005


def test_gpu_preset_without_gpu_is_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(distributed.TrainError, match="device: gpu") as e:
        distributed.setup(BUILTIN_PRESETS["137M"])
    assert "\n" not in str(e.value)


@cpu_only
def test_sdpa_core_attention_matches_megatron_dot_product_attention(tp1):
    """The fused core attention computes what megatron's own local DotProductAttention computes."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from kislurm.train.model import SDPAttention, layer_spec, transformer_config

    preset = BUILTIN_PRESETS["cpu-m"]
    assert layer_spec(preset).submodules.self_attention.submodules.core_attention is SDPAttention

    def build(spec):
        distributed.seed_all(2)
        return GPTModel(transformer_config(preset, 0.02, "fp32"), spec, 512, preset.seq_length,
                        share_embeddings_and_output_weights=True)

    ours, theirs = build(layer_spec(preset)), build(get_gpt_layer_local_spec())
    tokens, pos = _batch(500, 3, preset.seq_length, seed=5)
    a, b = ours(tokens, pos, None), theirs(tokens, pos, None)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # an explicit causal mask in megatron's convention (True = masked), as GPTDataset items can carry
    mask = torch.triu(torch.ones(preset.seq_length, preset.seq_length, dtype=torch.bool), 1).expand(3, 1, -1, -1)
    assert torch.allclose(ours(tokens, pos, mask), a, atol=1e-6)
    la, lb = ours(tokens, pos, None, labels=tokens), theirs(tokens, pos, None, labels=tokens)
    la.mean().backward()
    lb.mean().backward()
    ga = ours.decoder.layers[0].self_attention.linear_qkv.weight.grad
    gb = theirs.decoder.layers[0].self_attention.linear_qkv.weight.grad
    assert torch.allclose(ga, gb, atol=1e-6, rtol=1e-4)


def test_transformer_engine_is_opt_in():
    """Local layers unless a GPU preset asks for TE; asking without a GPU and TE is one line, on CPU refused by the
    config already. (The TE layers themselves are built only by tests/test_gpu.py, on a GPU with TE.)"""
    import dataclasses

    from kislurm.plan.config import ConfigError
    from kislurm.plan.loader import config_from_dict
    from kislurm.plan.presets import BUILTIN_PRESETS
    from kislurm.train.model import SDPAttention, layer_spec

    for name in ("cpu-s", "137M", "1.3B-llama"):
        assert BUILTIN_PRESETS[name].transformer_impl == "local"
    assert layer_spec(BUILTIN_PRESETS["137M"]).submodules.self_attention.submodules.core_attention is SDPAttention
    te = dataclasses.replace(BUILTIN_PRESETS["137M"], transformer_impl="transformer_engine")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a GPU with Transformer Engine importable.*no GPU.*"
                                              "transformer_impl: local"):
            layer_spec(te)
    with pytest.raises(ConfigError, match="models.m.transformer_impl: transformer_engine layers run on GPU only"):
        config_from_dict({"models": {"m": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                           "transformer_impl": "transformer_engine"}}})


@pytest.mark.parametrize("bias", [True, False])
def test_linear_bias_eps_and_rope_base_reach_megatron(tp1, bias):
    """The options a base model imported from HuggingFace sets (kislurm.plan.hf): counted by the one formula."""
    preset = ModelPreset(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, position_embedding="rope",
                         activation="swiglu", normalization="rmsnorm", linear_bias=bias, norm_eps=1e-6,
                         rotary_base=5e5)
    model = build_model(preset, vocab_size=100, init_std=0.02, precision="fp32")
    assert count_parameters(model) == preset.param_counts(padded_vocab_size(100))
    assert any(n.endswith("linear_fc1.bias") for n, _ in model.named_parameters()) == bias
    assert model.decoder.layers[0].input_layernorm.eps == 1e-6 and model.rotary_pos_emb.inv_freq[1].item() == \
        pytest.approx(5e5 ** (-2 / 8))
