"""Datasets: the per-dataset table, loading through `wilds`, prompts and official evaluation."""
