"""kislurm.plan: the grid: experiment config, cells, cost estimates."""
