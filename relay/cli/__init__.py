"""The `policy-relay` command line: serve, check, test, and the operator's tools."""
