"""Scheduling: the admission queue, continuous batching, KV blocks and the prefix cache, and the
shards' gRPC client."""
