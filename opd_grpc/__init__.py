"""opd-grpc: the token engine of a hospital's outpatient department, served over gRPC."""
