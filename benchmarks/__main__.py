"""``python -m benchmarks``: the retry-policy comparison (see :mod:`benchmarks.compare_policies`)."""

from benchmarks.compare_policies import main

raise SystemExit(main())
