"""The rules of SPEC.md as plain Python: the domain model and the service layer. No gRPC, no SQL."""
