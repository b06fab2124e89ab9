"""kislurm.cluster: Slurm submission, status, the compute-node entry, preflights."""
