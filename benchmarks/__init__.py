"""Benchmark scripts (``python -m benchmarks.NAME``); ``python -m benchmarks.all`` runs the speed suite.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads OpenMP: on a shared
2-core machine busy-waiting threads made torch runs 25-50x slower (docs/FACTS.md).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DMDCTL_QUIET", "1")
