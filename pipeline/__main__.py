"""`python -m pipeline`: the `distill` command without the console script."""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
