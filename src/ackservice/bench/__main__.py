"""``python -m ackservice.bench``."""

from __future__ import annotations

import sys

from .cli import main

# Guarded: --procs starts worker processes with multiprocessing's "spawn" method, which
# imports this module again (as __mp_main__) in each worker.
if __name__ == "__main__":
    sys.exit(main())
