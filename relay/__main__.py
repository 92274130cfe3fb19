"""`python -m relay` is `policy-relay`."""

from relay.cli.main import main

raise SystemExit(main())
