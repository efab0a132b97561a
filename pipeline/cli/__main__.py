"""`python -m pipeline.cli` (how torchrun starts each training process)."""

from pipeline.cli import entry

entry()
