"""``python -m preftune``: the CLI, so launchers that take a module run it.

    torchrun --standalone --nproc-per-node 2 -m preftune train --model M --data train.jsonl ... --output runs/x
"""

import sys

from .cli import main

sys.exit(main())
