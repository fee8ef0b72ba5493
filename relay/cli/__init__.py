"""The `sts-relay` command line: serve and the operator commands."""
