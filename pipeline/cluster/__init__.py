"""Running the pipeline's DVC stages on a cluster (orchestration around DVC, beside the CLI)."""
