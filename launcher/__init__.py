"""pytgi launcher: spawns and supervises shards and the router."""
