"""kislurm.analysis: aggregation, collapse points, the law, reports."""
