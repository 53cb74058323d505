"""``python -m oreo_fast.train`` and ``torchrun -m oreo_fast.train``."""
import sys

from oreo_fast.train.trainer import main

sys.exit(main())
