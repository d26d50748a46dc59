#!/usr/bin/env python3
"""sglang-overlay's command line: ``python3 scripts/overlay.py VERB ...`` (``--help`` lists the verbs).

The tool itself is the package scripts/overlay_tool/ (its __init__ lists the modules).
"""

import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from overlay_tool.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
