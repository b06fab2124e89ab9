"""The plain-PyTorch GPT that kislurm's megatron trainer is measured against, and its training loop.

One implementation for every throughput comparison: `kislurm preflight` (the same job, after the megatron steps),
tools/bench_gpu.py (one GPU) and tools/bench_train.py (CPU). It is a nanoGPT-style model of the preset's exact
shape and architecture: pre-norm blocks with biases (megatron's add_bias_linear), learned or rotary positions,
GeLU or SwiGLU MLP (fc1 holding both halves of the gated unit, as megatron's does), LayerNorm or RMSNorm,
grouped-query attention through torch's fused scaled_dot_product_attention, and a tied or untied output layer
without bias. Its parameter count equals ModelPreset.param_counts (tests/test_baseline.py), so both models do the
same FLOPs. Training: AdamW (betas 0.9/0.95, weight decay on matrices only), the trainer's learning-rate schedule,
masked-mean loss over the step's samples, gradient clipping; on a GPU bf16 autocast over fp32 weights and fused
AdamW, on CPU fp32.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from kislurm.plan.presets import ModelPreset
from kislurm.plan.training import TrainConfig

ROPE_BASE = 10_000.0
"""megatron's default rotary_base."""
NORM_EPS = 1e-5
"""megatron's default layernorm_epsilon (LayerNorm and RMSNorm)."""


def _norm(preset: ModelPreset) -> nn.Module:
    h = preset.hidden_size
    return nn.RMSNorm(h, eps=NORM_EPS) if preset.normalization == "rmsnorm" else nn.LayerNorm(h, eps=NORM_EPS)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Block(nn.Module):
    """One pre-norm transformer layer of the preset's architecture."""

    def __init__(self, p: ModelPreset):
        super().__init__()
        h, self.heads, self.groups = p.hidden_size, p.num_attention_heads, p.query_groups
        self.head_dim = h // self.heads
        self.swiglu = p.activation == "swiglu"
        self.ln1, self.ln2 = _norm(p), _norm(p)
        self.qkv = nn.Linear(h, h + 2 * self.groups * self.head_dim)
        self.proj = nn.Linear(h, h)
        self.fc1 = nn.Linear(h, 2 * p.ffn if self.swiglu else p.ffn)
        self.fc2 = nn.Linear(p.ffn, h)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, h = x.shape
        kv = self.groups * self.head_dim
        q, k, v = self.qkv(self.ln1(x)).split([h, kv, kv], dim=2)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(b, s, self.groups, self.head_dim).transpose(1, 2) for t in (k, v))
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)  # bf16 under autocast, as the projections' output
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.groups != self.heads)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        up = self.fc1(self.ln2(x))
        if self.swiglu:
            gate, lin = up.chunk(2, dim=-1)
            act = F.silu(gate) * lin
        else:
            act = F.gelu(up)
        return x + self.fc2(act)


class PlainGPT(nn.Module):
    """A GPT of the preset's shape and architecture with `vocab` (padded) embedding rows; returns per-token loss."""

    def __init__(self, p: ModelPreset, vocab: int):
        super().__init__()
        h = p.hidden_size
        self.wte = nn.Embedding(vocab, h)
        self.wpe = nn.Embedding(p.seq_length, h) if p.position_embedding == "learned" else None
        self.blocks = nn.ModuleList(Block(p) for _ in range(p.num_layers))
        self.ln_f = _norm(p)
        self.lm_head = None if p.tie_embeddings else nn.Linear(h, vocab, bias=False)
        head_dim = h // p.num_attention_heads
        if p.position_embedding == "rope":
            inv = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
            angles = torch.outer(torch.arange(p.seq_length, dtype=torch.float32), inv)
            angles = torch.cat((angles, angles), dim=-1)  # megatron's non-interleaved rotary layout
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
        else:
            self.cos = self.sin = None
        for w in self.parameters():
            if w.dim() >= 2:
                nn.init.normal_(w, std=0.02)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        rope = None
        if self.cos is not None:
            s = tokens.shape[1]
            rope = (self.cos[:s], self.sin[:s])
        for blk in self.blocks:
            x = blk(x, rope)
        x = self.ln_f(x)
        logits = self.lm_head(x) if self.lm_head is not None else x @ self.wte.weight.t()
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none").view_as(labels)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class PlainTrainer:
    """Trains PlainGPT on `dataset` (megatron GPTDataset items): `samples_per_step` samples per optimiser step in
    micro-batches of train.micro_batch_size (one DP rank's share of a global batch)."""

    def __init__(self, preset: ModelPreset, train: TrainConfig, dataset: Any, vocab: int, total_steps: int,
                 samples_per_step: int, device: torch.device | str = "cpu"):
        self.preset, self.train, self.dataset = preset, train, dataset
        self.total_steps, self.samples_per_step, self.step = total_steps, samples_per_step, 0
        self.device = torch.device(device)
        self.model = PlainGPT(preset, vocab).to(self.device)
        cuda = self.device.type == "cuda"
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        flat = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                                      {"params": flat, "weight_decay": 0.0}], lr=train.lr, betas=(0.9, 0.95),
                                     eps=1e-8, **({"fused": True} if cuda else {"foreach": True}))

    def _batch(self, ids: Sequence[int]) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in ids]
        return {k: torch.stack([it[k] for it in items]).to(self.device)
                for k in ("tokens", "labels", "loss_mask", "position_ids")}

    def _train_step(self) -> float:
        from kislurm.train.trainer import lr_at

        t, cuda = self.train, self.device.type == "cuda"
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.total_steps, t)
        self.opt.zero_grad(set_to_none=True)
        first = self.step * self.samples_per_step
        batches = [self._batch(range(i, min(i + t.micro_batch_size, first + self.samples_per_step)))
                   for i in range(first, first + self.samples_per_step, t.micro_batch_size)]
        n_tok = sum(b["loss_mask"].sum() for b in batches)
        loss = torch.zeros((), device=self.device)
        for b in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                per_token = self.model(b["tokens"], b["position_ids"], b["labels"])
            summed = (per_token.float() * b["loss_mask"]).sum()
            (summed / n_tok).backward()
            loss += summed.detach()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.opt.step()
        self.step += 1
        return float(loss / n_tok)  # read every step, as kislurm's trainer does

    def train_steps(self, n: int) -> float:
        """Run n steps; returns tokens/s over them (synchronised with the GPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(n):
            self._train_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return n * self.samples_per_step * self.preset.seq_length / (time.perf_counter() - start)


def plain_tokens_per_s(preset: ModelPreset, train: TrainConfig, dataset: Any, vocab: int, steps: int,
                       samples_per_step: int, device: torch.device | str = "cpu", warmup: int = 1) -> float:
    """tokens/s of `steps` timed plain-PyTorch steps after `warmup` untimed ones (kernels, allocator, buffers)."""
    trainer = PlainTrainer(preset, train, dataset, vocab, warmup + steps, samples_per_step, device)
    trainer.train_steps(warmup)
    return trainer.train_steps(steps)
