"""`python -m benchmarks`: see `benchmarks.run.main`."""

from .run import main

raise SystemExit(main())
