"""``python -m bench``: the benchmark matrix (bench/run.py)."""
import sys

from bench.run import main

sys.exit(main())
