"""Benchmarks (not tests): shard-level gRPC benchmark and HTTP load generator."""
