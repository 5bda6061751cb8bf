"""HTTP plumbing: the server and its shutdown, API keys, probes, SSE streams, and the API docs."""
