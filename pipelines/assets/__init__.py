"""Assets by stage: data -> embeddings -> banks -> evaluation (one asset per method) -> reports."""
