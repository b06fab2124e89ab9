"""kislurm.data: knowledge base, tokenizer, token streams, prepared datasets."""
