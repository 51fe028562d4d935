"""Shared building blocks of Damselfly: config, ids, pieces, digests, errors, origin clients."""
