"""The pack's command line run by its file path: ``python path/to/the/pack/cli.py generate ...``, the
same as ``python -m facediffuser_core generate ...`` run in the pack's folder. For Pythons that do not
put the working directory (or a script's folder) on ``sys.path``: the Windows portable build's
``python_embeded``, whose ``._pth`` file fixes ``sys.path``."""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from facediffuser_core.__main__ import main

    sys.exit(main())
