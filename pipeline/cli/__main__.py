"""`python -m pipeline.cli` (how torchrun starts each training process)."""

import sys

from pipeline.cli import main

sys.exit(main())
