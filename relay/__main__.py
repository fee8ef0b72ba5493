"""`python -m relay` is the same as the `sts-relay` command."""

from relay.cli import main

raise SystemExit(main())
