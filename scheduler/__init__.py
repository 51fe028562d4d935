"""The central scheduler: a pure scheduling core and a thin gRPC adapter over it."""
