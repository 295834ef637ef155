"""The gRPC face of the engine: translation between protos and the domain, and status codes."""
