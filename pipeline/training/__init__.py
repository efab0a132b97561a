"""Training: the engine and its parts (models, optimizers and schedules, batches, augmentation,
checkpoints, data-parallel helpers, progress), batched inference, scores and plots."""
