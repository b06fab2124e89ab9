"""kislurm.train: megatron-core model, distributed setup, trainer, checkpoints."""
