"""Constrained decoding on the router: grammars built from requests, their cost bounded and
compile-checked before a request is queued."""
