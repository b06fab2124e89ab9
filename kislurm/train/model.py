"""Build a megatron-core GPTModel from a ModelPreset; count its parameters.

The builder contains no parallelism and no CPU workarounds (torchtitan's rule): it reads the tensor-parallel
degree from megatron's own parallel state, which the caller has initialised (kislurm.train.distributed). Its layers are
megatron's pure-PyTorch "local" ones (the only ones that run on CPU, and the tested path on GPU too); Transformer
Engine's fused layers only when a GPU preset opts in (`transformer_impl: transformer_engine`): that path has never
run in this project's tests, and the GPU machine it is lent has no TE.

CPU presets initialise weights from the torch default generator (`use_cpu_initialization`): a model is then the
same function of its seed at every TP degree, which is what makes TP=1 and TP=2 losses comparable. GPU presets
initialise on the device from megatron's per-rank RNG streams (a full CPU master copy of each 7B weight per rank
would not fit), so there the init depends on the TP degree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.spec_utils import ModuleSpec

from kislurm.plan.config import ConfigError
from kislurm.plan.presets import ModelPreset, resolve_precision
from kislurm.plan.estimate import VOCAB_MULTIPLE, padded_vocab_size  # noqa: F401 - re-exported for callers


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match the CUDA/torch installed
        return False
    return True


class SDPAttention(DotProductAttention):
    """megatron's local core attention computed by torch's fused scaled_dot_product_attention.

    Same maths as DotProductAttention (scale, causal or given mask, dropout from the TP-rank RNG stream) without
    materialising the scores through baddbmm / masked_fill / softmax: about 10% of a small model's CPU step.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "SDPAttention supports plain attention only"
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=2), value.repeat_interleave(groups, dim=2)
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, n, d] -> [b, n, s, d]
        mask_type = attn_mask_type or self.attn_mask_type
        keep = None if attention_mask is None else ~attention_mask  # megatron: True = masked out
        causal = keep is None and mask_type == AttnMaskType.causal and sq == k.shape[2] and sq > 1
        p = self.attention_dropout.p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p, is_causal=causal,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


_NORM = {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}
"""ModelPreset.normalization -> megatron's TransformerConfig.normalization."""


def layer_spec(preset: ModelPreset) -> ModuleSpec:
    """megatron's pure-PyTorch "local" layers with torch's fused attention (SDPAttention) as the core attention;
    Transformer Engine's layers only when the preset opts in (transformer_impl: transformer_engine), refused in one
    line where TE or the GPU is missing. The norm comes from megatron's own spec argument (torch's RMSNorm in the
    local spec); activation, RoPE and query groups are TransformerConfig / GPTModel options."""
    if preset.transformer_impl == "transformer_engine":
        if not (preset.device == "gpu" and torch.cuda.is_available() and have_transformer_engine()):
            raise ConfigError("transformer_impl: transformer_engine needs a GPU with Transformer Engine importable, "
                              "and this process has " + ("no GPU" if not torch.cuda.is_available() else "no TE")
                              + "; fix: set the preset's transformer_impl: local (the tested default), or install "
                              "transformer_engine[pytorch] matching this CUDA and torch")
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()  # TE's fused norms read config.normalization
    spec = get_gpt_layer_local_spec(normalization=_NORM[preset.normalization])
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def transformer_config(preset: ModelPreset, init_std: float, precision: str) -> TransformerConfig:
    """megatron's TransformerConfig for a preset; TP/PP sizes come from the initialised parallel state."""
    bf16 = resolve_precision(preset, precision) == "bf16"
    gpu = preset.device == "gpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    swiglu = preset.activation == "swiglu"
    return TransformerConfig(
        num_layers=preset.num_layers,
        hidden_size=preset.hidden_size,
        num_attention_heads=preset.num_attention_heads,
        num_query_groups=preset.query_groups,
        ffn_hidden_size=preset.ffn,
        normalization=_NORM[preset.normalization],
        layernorm_epsilon=preset.norm_eps,
        add_bias_linear=preset.linear_bias,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=init_std,
        use_cpu_initialization=preset.device == "cpu",
        # megatron's own fused kernels (jit-scripted bias+GeLU / bias+SwiGLU, bias+dropout+add, vocab-parallel
        # cross entropy): they need no Transformer Engine or Apex; GPU only, so CPU numerics stay the plain layers'.
        bias_activation_fusion=gpu,
        bias_dropout_fusion=gpu,
        cross_entropy_loss_fusion=gpu,
        cross_entropy_fusion_impl="native",
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )


def build_model(preset: ModelPreset, vocab_size: int, init_std: float, precision: str) -> GPTModel | Float16Module:
    """A GPT of the preset's architecture (GPT-2's by default), initialised from the current torch seed.

    Needs megatron's parallel state initialised (kislurm.train.distributed.setup). The vocabulary is padded to a
    multiple of VOCAB_MULTIPLE. On a GPU the model is moved to the current CUDA device; in bf16 it comes wrapped in
    megatron's Float16Module (attributes of the GPTModel are on `.module`). Under TP the model returns
    vocab-sharded logits unless called with `runtime_gather_output=True`.
    """
    config = transformer_config(preset, init_std, precision)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(preset),
        vocab_size=padded_vocab_size(vocab_size),
        max_sequence_length=preset.seq_length,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=preset.tie_embeddings,
        position_embedding_type="rope" if preset.position_embedding == "rope" else "learned_absolute",
        rotary_base=preset.rotary_base,
    )
    if preset.device == "gpu" and torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        # As megatron's own training does: every weight in bf16 (the local layers' norms are built in fp32) and
        # the output (per-token loss or logits) back in fp32. Checkpoint keys are the wrapped model's.
        return Float16Module(config, model)
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts of the built model, computed on any one TP rank (what ModelPreset.param_counts predicts).

    TP-sharded tensors (megatron marks them `tensor_model_parallel`) count once per TP rank; replicated ones
    (norms, row-parallel biases, learned positions) once, and are also counted as `replicated`. Embedding = word
    and position embeddings, plus the output layer when it is not tied to the input embedding.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    total = embedding = replicated = 0
    for name, p in model.named_parameters():
        sharded = getattr(p, "tensor_model_parallel", False)
        n = p.numel() * (tp if sharded else 1)
        total += n
        replicated += 0 if sharded else n
        if "embedding" in name or f".{name}".endswith(".output_layer.weight"):
            embedding += n
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding, "replicated": replicated}
