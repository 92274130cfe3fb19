"""Several worker processes that behave as one relay: the supervisor, its hub and the link."""
