"""`python -m tools.bench`: the benchmark without the CLI wrapper."""

from . import main

raise SystemExit(main())
