"""`python -m visionpipe.cli ...`: the same entry as the `visionpipe` command."""

from visionpipe.cli import main

raise SystemExit(main())
