"""pytgi shard: one model process per device, serving the TextGenerationService over gRPC."""
