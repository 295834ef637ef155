"""`make bench`: AllocateToken's throughput and latency as ratios against a no-op RPC on the same server."""
