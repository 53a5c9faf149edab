"""Peers of the subtraction benchmark: a synthetic pair with its truth, a runner per method, one scoring."""
