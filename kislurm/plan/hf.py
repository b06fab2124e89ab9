"""megatron-core GPTModel <-> HuggingFace transformers: one mapping, read both ways.

megatron-core ships only a TensorRT-LLM exporter, and the field's converters need their own training stacks
(Megatron-LM's tools/checkpoint reads Megatron-LM's arguments from the checkpoint; Megatron-Bridge pins Python 3.12
and its own megatron-core), so kislurm maps the state dict of its own GPTModel (TP=1, local layers) itself:

  family  kislurm preset                                        stock class
  llama   rope + swiglu + rmsnorm (any query groups, tied or     LlamaForCausalLM (attention_bias / mlp_bias =
          untied, with or without linear biases)                  linear_bias)
  gpt2    learned positions + gelu + layernorm, one key/value    GPT2LMHeadModel (activation_function "gelu", the
          head per query head, linear biases                      exact erf GeLU megatron uses; Conv1D weights are
                                                                  the transposed Linear ones)

Any other combination (RoPE with LayerNorm, a GELU MLP with RoPE, GQA with learned positions, ...) has no stock
class and is refused in one line naming it.

The layout megatron names and this module converts:
  - linear_qkv holds the attention's Q, K and V interleaved per key/value group: for each group g, its query heads,
    then its key head, then its value head (rows of head_dim each). HF keeps q_proj / k_proj / v_proj (Llama) or
    one c_attn with all queries, then all keys, then all values (GPT-2).
  - The local layers keep the norms as their own modules (input_layernorm, pre_mlp_layernorm); Transformer Engine's
    layers fuse them into linear_qkv / linear_fc1 as `layer_norm_weight`: kislurm exports the local layers only.
  - linear_fc1 of a gated MLP holds [gate; up] (megatron's glu: silu(first half) * second half).
  - RoPE: megatron's default, non-interleaved rotation (rotate_half), which is HF Llama's; no weight permutation.
  - The embedding (and an untied output layer) has padded_vocab_size rows; HF gets len(tokenizer) rows (the
    padding rows are trimmed), and an import pads them back with zeros.

It sits in the plan stage because a preset can come from a base model's config.json (`init_from`): the config
loader reads it through preset_from_hf, and the train and cluster stages map weights through the same tables. The
module is pure (tensors in, tensors out) but for the transformers models it builds and reads.

State dicts here are at TP=1: a checkpoint written at any TP degree is loaded at TP=1 by megatron's distributed
checkpointing (kislurm.train.checkpoint.load_weights), which reshards it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from kislurm.errors import KislurmError
from kislurm.plan.presets import ModelPreset

HF_EXTRA = "pip install 'kislurm[hf]'"


class HFError(KislurmError, ValueError):
    """A model that cannot cross between kislurm and HuggingFace; the message is one line with the fix."""


def require_hf() -> Any:
    """The transformers module, or a one-line HFError naming the extra to install."""
    try:
        transformers = importlib.import_module("transformers")
        importlib.import_module("safetensors")
    except ImportError as e:
        missing = e.name or "transformers"
        raise HFError(f"HuggingFace export and import need transformers and safetensors ({missing} is missing); "
                      f"fix: {HF_EXTRA}") from None
    return transformers


# ----------------------------------------------------------------------------------------------------------------------
# Families: which stock class expresses a preset, and its config both ways
# ----------------------------------------------------------------------------------------------------------------------

LLAMA = {"position_embedding": "rope", "activation": "swiglu", "normalization": "rmsnorm"}
GPT2 = {"position_embedding": "learned", "activation": "gelu", "normalization": "layernorm"}


def family(preset: ModelPreset) -> str:
    """'llama' or 'gpt2': the stock class that expresses `preset` exactly; HFError naming what none expresses."""
    arch = {k: getattr(preset, k) for k in LLAMA}
    described = ", ".join(f"{k}: {v}" for k, v in arch.items())
    if arch == LLAMA:
        return "llama"
    if arch == GPT2:
        if preset.query_groups != preset.num_attention_heads:
            raise HFError(f"GPT2LMHeadModel has one key/value head per query head, this preset has "
                          f"num_query_groups {preset.query_groups} for {preset.num_attention_heads} heads; fix: "
                          "unset num_query_groups, or use the Llama options (rope, swiglu, rmsnorm)")
        if not preset.linear_bias:
            raise HFError("GPT2LMHeadModel always has linear biases, this preset has linear_bias: false; fix: set "
                          "linear_bias: true, or use the Llama options (rope, swiglu, rmsnorm)")
        return "gpt2"
    raise HFError(f"no stock transformers class expresses {described}; fix: use GPT-2's (learned, gelu, layernorm) "
                  "or Llama's (rope, swiglu, rmsnorm) combination")


def hf_config(preset: ModelPreset, vocab_size: int, eos: int, pad: int) -> Any:
    """The transformers config of `preset` with `vocab_size` rows (len(tokenizer)) and the tokenizer's eos/pad."""
    transformers = require_hf()
    kind = family(preset)
    p = preset
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.ffn,
            num_hidden_layers=p.num_layers, num_attention_heads=p.num_attention_heads,
            num_key_value_heads=p.query_groups, head_dim=p.hidden_size // p.num_attention_heads, hidden_act="silu",
            max_position_embeddings=p.seq_length, rms_norm_eps=p.norm_eps, tie_word_embeddings=p.tie_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": p.rotary_base}, attention_bias=p.linear_bias,
            mlp_bias=p.linear_bias, bos_token_id=eos, eos_token_id=eos, pad_token_id=pad,
            architectures=["LlamaForCausalLM"], dtype="float32")
    return transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=p.seq_length, n_embd=p.hidden_size, n_layer=p.num_layers,
        n_head=p.num_attention_heads, n_inner=p.ffn, activation_function="gelu", layer_norm_epsilon=p.norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=p.tie_embeddings, bos_token_id=eos,
        eos_token_id=eos, pad_token_id=pad, architectures=["GPT2LMHeadModel"], dtype="float32")


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise HFError(f"{config.model_type}: RoPE scaling {kind!r} has no megatron-core local-layer equivalent here; "
                      "fix: start from a base with plain RoPE (rope_type default)")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


ARCH_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "position_embedding",
               "activation", "normalization", "num_query_groups", "tie_embeddings", "linear_bias", "norm_eps",
               "rotary_base")
"""The preset fields a base model's config.json decides (init_from)."""


def base_preset_fields(path: str, seq_length: int | None = None) -> dict[str, Any]:
    """The architecture fields (and seq_length) of the preset of the HF folder `path`, read from its config.json."""
    transformers = require_hf()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise HFError(f"{path}: not a HuggingFace model folder ({str(e).splitlines()[0][:120]}); fix: pass a folder "
                      "with config.json and safetensors weights (save_pretrained writes one)") from None
    preset = preset_from_hf(config, seq_length)
    return {k: getattr(preset, k) for k in (*ARCH_FIELDS, "seq_length")}


def preset_from_hf(config: Any, seq_length: int | None = None) -> ModelPreset:
    """The kislurm preset (CPU, TP=1; a grid sets its own layout) of a Llama- or GPT-2-family config."""
    kind = getattr(config, "model_type", None)
    if kind == "llama":
        heads = config.num_attention_heads
        if getattr(config, "head_dim", None) not in (None, config.hidden_size // heads):
            raise HFError(f"llama: head_dim {config.head_dim} is not hidden_size / heads; megatron's local layers "
                          "derive it; fix: start from a base with head_dim = hidden_size / num_attention_heads")
        if config.hidden_act != "silu" or config.attention_bias != config.mlp_bias:
            raise HFError(f"llama: hidden_act {config.hidden_act!r} with attention_bias {config.attention_bias} and "
                          f"mlp_bias {config.mlp_bias}: kislurm presets have SiLU and one linear_bias; fix: start "
                          "from a base with hidden_act silu and matching biases")
        return ModelPreset(num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
                           num_attention_heads=heads, ffn_hidden_size=config.intermediate_size,
                           seq_length=seq_length or config.max_position_embeddings, **LLAMA,
                           num_query_groups=config.num_key_value_heads or heads,
                           tie_embeddings=bool(config.tie_word_embeddings), linear_bias=bool(config.attention_bias),
                           norm_eps=float(config.rms_norm_eps), rotary_base=_rope_theta(config))
    if kind == "gpt2":
        if config.activation_function != "gelu" or config.scale_attn_by_inverse_layer_idx or \
                not config.scale_attn_weights or config.reorder_and_upcast_attn:
            raise HFError(f"gpt2: activation_function {config.activation_function!r} (and its attention scaling "
                          "options) differ from megatron's exact GeLU and 1/sqrt(head_dim) scaling; fix: start from a "
                          "GPT-2 config with activation_function gelu and default attention scaling")
        return ModelPreset(num_layers=config.n_layer, hidden_size=config.n_embd, num_attention_heads=config.n_head,
                           ffn_hidden_size=config.n_inner or 4 * config.n_embd,
                           seq_length=seq_length or config.n_positions, **GPT2,
                           tie_embeddings=bool(config.tie_word_embeddings), norm_eps=float(config.layer_norm_epsilon))
    raise HFError(f"model_type {kind!r} is not supported; fix: start from a Llama- or GPT-2-family model "
                  "(LlamaForCausalLM, GPT2LMHeadModel)")


# ----------------------------------------------------------------------------------------------------------------------
# The mapping: one table per family, read megatron -> HF by to_hf and HF -> megatron by from_hf
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """One megatron tensor and the HF tensor(s) it is, through `kind`:
    copy (same tensor), T (transposed: GPT-2's Conv1D), vocab (rows trimmed / zero-padded), qkv (megatron's per-group
    interleaving <-> separate q, k, v), qkv_cat (the same, then concatenated [q; k; v] along the output, transposed
    for GPT-2's c_attn weight when `transpose`), cat (megatron's [gate; up] <-> gate, up)."""

    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"
    transpose: bool = False


def rules(preset: ModelPreset) -> list[Rule]:
    """The mapping of `preset` (its family's table, with the optional tensors it has)."""
    kind, bias = family(preset), preset.linear_bias
    out: list[Rule] = []
    if kind == "llama":
        out.append(Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"))
        for i in range(preset.num_layers):
            m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
            a, f = h + "self_attn.", h + "mlp."
            out += [Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
                    Rule(m + "self_attention.linear_qkv.weight", tuple(a + f"{x}_proj.weight" for x in "qkv"), "qkv"),
                    Rule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",)),
                    Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
                    Rule(m + "mlp.linear_fc1.weight", (f + "gate_proj.weight", f + "up_proj.weight"), "cat"),
                    Rule(m + "mlp.linear_fc2.weight", (f + "down_proj.weight",))]
            if bias:
                out += [Rule(m + "self_attention.linear_qkv.bias", tuple(a + f"{x}_proj.bias" for x in "qkv"), "qkv"),
                        Rule(m + "self_attention.linear_proj.bias", (a + "o_proj.bias",)),
                        Rule(m + "mlp.linear_fc1.bias", (f + "gate_proj.bias", f + "up_proj.bias"), "cat"),
                        Rule(m + "mlp.linear_fc2.bias", (f + "down_proj.bias",))]
        out.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    else:
        out += [Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), "vocab"),
                Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",))]
        for i in range(preset.num_layers):
            m, h = f"decoder.layers.{i}.", f"transformer.h.{i}."
            for norm, ln in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                out += [Rule(m + f"{norm}.{x}", (h + f"{ln}.{x}",)) for x in ("weight", "bias")]
            out += [Rule(m + "self_attention.linear_qkv.weight", (h + "attn.c_attn.weight",), "qkv_cat", True),
                    Rule(m + "self_attention.linear_qkv.bias", (h + "attn.c_attn.bias",), "qkv_cat"),
                    Rule(m + "self_attention.linear_proj.weight", (h + "attn.c_proj.weight",), "T"),
                    Rule(m + "self_attention.linear_proj.bias", (h + "attn.c_proj.bias",)),
                    Rule(m + "mlp.linear_fc1.weight", (h + "mlp.c_fc.weight",), "T"),
                    Rule(m + "mlp.linear_fc1.bias", (h + "mlp.c_fc.bias",)),
                    Rule(m + "mlp.linear_fc2.weight", (h + "mlp.c_proj.weight",), "T"),
                    Rule(m + "mlp.linear_fc2.bias", (h + "mlp.c_proj.bias",))]
        out += [Rule("decoder.final_layernorm.weight", ("transformer.ln_f.weight",)),
                Rule("decoder.final_layernorm.bias", ("transformer.ln_f.bias",))]
    if not preset.tie_embeddings:
        out.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


def _qkv_split(w: torch.Tensor, preset: ModelPreset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's linear_qkv rows (per group: its query heads, its key head, its value head) -> q, k, v rows."""
    g, d = preset.query_groups, preset.hidden_size // preset.num_attention_heads
    r = preset.num_attention_heads // g
    grouped = w.reshape(g, r + 2, d, *w.shape[1:])
    return (grouped[:, :r].reshape(g * r * d, *w.shape[1:]), grouped[:, r].reshape(g * d, *w.shape[1:]),
            grouped[:, r + 1].reshape(g * d, *w.shape[1:]))


def _qkv_merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: ModelPreset) -> torch.Tensor:
    """The inverse of _qkv_split."""
    g, d = preset.query_groups, preset.hidden_size // preset.num_attention_heads
    r = preset.num_attention_heads // g
    rest = q.shape[1:]
    parts = (q.reshape(g, r, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(g * (r + 2) * d, *rest)


def _to_hf(rule: Rule, w: torch.Tensor, preset: ModelPreset, vocab: int) -> list[torch.Tensor]:
    if rule.kind == "copy":
        return [w]
    if rule.kind == "T":
        return [w.t()]
    if rule.kind == "vocab":
        return [w[:vocab]]
    if rule.kind == "cat":
        return list(torch.chunk(w, 2, dim=0))
    q, k, v = _qkv_split(w, preset)
    if rule.kind == "qkv":
        return [q, k, v]
    merged = torch.cat((q, k, v), dim=0)  # qkv_cat
    return [merged.t() if rule.transpose else merged]


def _from_hf(rule: Rule, ws: list[torch.Tensor], preset: ModelPreset, rows: int) -> torch.Tensor:
    if rule.kind == "copy":
        return ws[0]
    if rule.kind == "T":
        return ws[0].t()
    if rule.kind == "vocab":
        w = ws[0]
        if w.shape[0] > rows:
            raise HFError(f"the HF embedding has {w.shape[0]} rows, more than the {rows} of the megatron model; "
                          "fix: build the model from the tokenizer that belongs to the base")
        return torch.cat((w, w.new_zeros(rows - w.shape[0], *w.shape[1:])))
    if rule.kind == "cat":
        return torch.cat(ws, dim=0)
    if rule.kind == "qkv":
        return _qkv_merge(*ws, preset)
    merged = ws[0].t() if rule.transpose else ws[0]  # qkv_cat
    h, kv = preset.hidden_size, preset.query_groups * (preset.hidden_size // preset.num_attention_heads)
    q, k, v = torch.split(merged, [h, kv, kv], dim=0)
    return _qkv_merge(q, k, v, preset)


def _tensors(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A megatron state dict without its `_extra_state` entries (Transformer Engine's FP8 metadata: none here)."""
    return {k: v for k, v in sd.items() if not k.endswith("._extra_state")}


def _check_keys(have: set[str], want: set[str], what: str) -> None:
    if have != want:
        extra, missing = sorted(have - want), sorted(want - have)
        raise HFError(f"{what}: unexpected tensors {extra[:3]}, missing {missing[:3]}; fix: export only models built "
                      "by kislurm.train.model.build_model with the local layers (the mapping covers these)")


def to_hf(megatron_sd: dict[str, Any], preset: ModelPreset, vocab_size: int) -> dict[str, torch.Tensor]:
    """HF state dict (contiguous, for safetensors) of a TP=1 megatron state dict, `vocab_size` rows kept."""
    table = rules(preset)
    sd = _tensors(megatron_sd)
    _check_keys(set(sd), {r.megatron for r in table}, "megatron state dict")
    out: dict[str, torch.Tensor] = {}
    for rule in table:
        for name, tensor in zip(rule.hf, _to_hf(rule, sd[rule.megatron], preset, vocab_size)):
            out[name] = tensor.detach().clone().contiguous()
    return out


def from_hf(hf_sd: dict[str, torch.Tensor], preset: ModelPreset, rows: int) -> dict[str, torch.Tensor]:
    """TP=1 megatron state dict (tensors only) of an HF state dict, the embedding padded to `rows`."""
    table = rules(preset)
    tied = {"lm_head.weight"} if preset.tie_embeddings else set()  # the tied copy HF state dicts list
    names = set(hf_sd) - tied - {k for k in hf_sd if k.endswith(".attn.bias") or k.endswith("rotary_emb.inv_freq")}
    _check_keys(names, {n for r in table for n in r.hf}, "HF state dict")
    return {r.megatron: _from_hf(r, [hf_sd[n] for n in r.hf], preset, rows).contiguous() for r in table}


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


def hf_model(preset: ModelPreset, megatron_sd: dict[str, Any], vocab_size: int, eos: int, pad: int) -> Any:
    """A transformers model (fp32, eval mode) holding the weights of a TP=1 megatron state dict."""
    transformers = require_hf()
    config = hf_config(preset, vocab_size, eos, pad)
    cls = transformers.LlamaForCausalLM if family(preset) == "llama" else transformers.GPT2LMHeadModel
    model = cls(config)
    weights = to_hf(megatron_sd, preset, vocab_size)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and preset.tie_embeddings)]
    if missing or unexpected:
        raise HFError(f"{cls.__name__}: missing {missing[:3]}, unexpected {unexpected[:3]} after mapping; "
                      "fix: a bug in kislurm.plan.hf's table for this transformers version")
    if preset.tie_embeddings:
        model.tie_weights()
    return model.eval()


def load_hf_weights(model: torch.nn.Module, hf_sd: dict[str, torch.Tensor], preset: ModelPreset) -> None:
    """Copy an HF state dict into a TP=1 megatron GPTModel built from `preset` (its padded rows zero)."""
    current = model.state_dict()
    rows = current["embedding.word_embeddings.weight"].shape[0]
    mapped = from_hf(hf_sd, preset, rows)
    for name, tensor in mapped.items():
        if current[name].shape != tensor.shape:
            raise HFError(f"{name}: the HF weights give shape {tuple(tensor.shape)}, the megatron model has "
                          f"{tuple(current[name].shape)}; fix: build the model from the base's own config.json")
    model.load_state_dict({**current, **mapped})


def on_cpu_tp1(preset: ModelPreset) -> ModelPreset:
    """The preset as a one-process fp32 CPU model (export and import run there; the checkpoint reshards to it)."""
    return dataclasses.replace(preset, device="cpu", tensor_parallel=1, pipeline_parallel=1, data_parallel=1,
                               transformer_impl="local", train=None)



def read_hf_folder(path: str, seq_length: int | None = None) -> tuple[ModelPreset, dict[str, torch.Tensor]]:
    """The preset (from config.json, checked before any weight is read) and fp32 state dict of an HF folder,
    read offline (nothing is downloaded)."""
    transformers = require_hf()
    preset = dataclasses.replace(ModelPreset(1, 1, 1), **base_preset_fields(path, seq_length))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return preset, {k: v.detach() for k, v in model.state_dict().items()}


def init_from_base(model: torch.nn.Module, preset: ModelPreset) -> None:
    """Start a TP=1 megatron model (a GPTModel, or megatron's Float16Module around one) from preset.init_from."""
    assert preset.init_from is not None
    base, hf_sd = read_hf_folder(preset.init_from, preset.seq_length)
    differs = [k for k in ARCH_FIELDS if getattr(base, k) != getattr(preset, k)]
    if differs:
        raise HFError(f"{preset.init_from}: its config.json no longer gives this preset's {', '.join(differs)}; fix: "
                      "plan the run again (the preset is read from config.json when the config is loaded)")
    load_hf_weights(getattr(model, "module", model), hf_sd, preset)
