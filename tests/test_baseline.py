"""The plain-PyTorch baseline: the same parameters as the megatron model for every architecture, and it trains."""

from __future__ import annotations

import itertools

import pytest
import torch

from kislurm.train.baseline import PlainGPT, PlainTrainer, parameter_count
from kislurm.plan.presets import ModelPreset
from kislurm.plan.training import TrainConfig
from kislurm.cluster.preflight import RandomTokens

OPTIONS = list(itertools.product(["learned", "rope"], ["gelu", "swiglu"], ["layernorm", "rmsnorm"], [None, 2],
                                 [True, False]))


@pytest.mark.parametrize("pos,act,norm,groups,tied", OPTIONS)
def test_plain_gpt_has_the_parameters_param_counts_predicts(pos, act, norm, groups, tied):
    preset = ModelPreset(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, position_embedding=pos,
                         activation=act, normalization=norm, num_query_groups=groups, tie_embeddings=tied)
    model = PlainGPT(preset, 128)
    assert parameter_count(model) == preset.param_counts(128)["total"]
    tokens = torch.randint(0, 128, (2, 16))
    loss = model(tokens, torch.arange(16).expand(2, 16), tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()


def test_plain_trainer_lowers_the_loss_of_a_repeated_batch():
    preset = ModelPreset(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16, position_embedding="rope",
                         activation="swiglu", normalization="rmsnorm", num_query_groups=2, tie_embeddings=False)
    train = TrainConfig(micro_batch_size=2, global_batch_size=4, lr=1e-2, warmup_frac=0.0)
    data = RandomTokens(4, 16, 128)
    trainer = PlainTrainer(preset, train, data, 128, total_steps=30, samples_per_step=4)
    trainer.step = 0
    first = trainer._train_step()
    for _ in range(20):
        trainer.step = 0  # the same samples every step
        last = trainer._train_step()
    assert last < first - 0.5, (first, last)
