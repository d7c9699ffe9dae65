"""Entry point: ``python -m fastvec.bench``."""

import sys

from fastvec.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
