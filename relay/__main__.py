"""`python -m relay` is `policy-relay`."""

from relay.cli import main

raise SystemExit(main())
