"""pytgi router: HTTP API, tokenization, queue, continuous batching, KV block ownership."""
