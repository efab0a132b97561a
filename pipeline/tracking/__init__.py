"""MLflow: the store and server (set up in one place), runs, model weights, lineage."""
