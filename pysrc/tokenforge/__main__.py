"""`python -m tokenforge ...` is the same as the `tokenforge` console script."""

from tokenforge.cli import main

raise SystemExit(main())
