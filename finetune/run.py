"""Training entry point for launchers: `accelerate launch finetune/run.py RECIPE [key.path=value ...]`.

Also runs as `python finetune/run.py ...` and `finetune train ...`.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script, Python puts this folder first on sys.path, where our module names could shadow
    # libraries; the repository root goes there instead so `finetune` imports as a package.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from finetune.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
