"""The model registry: the promotion policy (pure), aliases with their history, versions, the
model card."""
