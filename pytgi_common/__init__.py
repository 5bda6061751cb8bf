"""Rules the router and the shards must apply identically, written once and torch-free (the router
never imports torch): which sampling parameters mean argmax (sampling.py), how a grammar is compiled
and keyed (grammar.py)."""
