"""Reproducible image-classifier training: DVC data, GX validation, PyTorch, MLflow registry."""
