"""gRPC client of the served ``driffusion`` model (tritonclient), used by the CLI and tests."""
