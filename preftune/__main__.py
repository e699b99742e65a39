"""``python -m preftune``: the CLI, so launchers that take a module run it.

    torchrun --standalone --nproc-per-node 2 -m preftune train --model M --data train.jsonl ... --output runs/x
"""

import os
import sys

from .commands.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun, skip the interpreter's teardown: with gloo it sometimes aborts the process ("terminate
    # called without an active exception") after the run has finished, and torchrun then reports the whole
    # job as failed. Every file is already written atomically and fsynced; only stdio needs flushing.
    from .core.runtime import _shutdown

    _shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
