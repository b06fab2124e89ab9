"""kislurm.orchestrate: what to submit when: a run, the adaptive ladder, validation, the pilot and the demo."""
