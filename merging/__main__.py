"""``python -m merging``: the command line."""

import sys

from merging.compute.memory import keep_freed_memory
from merging.compute.threads import limit_spinning

# Before torch loads libgomp: idle OpenMP threads that spin for long starve other processes
# running at the same time (benchmarks/concurrent_runs.py measures it); the user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
limit_spinning()
keep_freed_memory()  # evaluation batches reuse freed memory instead of faulting it in again

from merging.cli.main import main  # noqa: E402 (after the spin limit, which must precede torch)

sys.exit(main())
