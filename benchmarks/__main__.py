"""``python -m benchmarks [options]``: the benchmark CLI (see benchmarks/cli.py)."""
import sys

from .cli import main

sys.exit(main())
