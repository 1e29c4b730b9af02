"""Evaluation: the measures registry and the pieces the embed and evaluate stages share."""
