"""``python -m bpfast``: the command line (see bpfast.cli); with no command, the demo."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
