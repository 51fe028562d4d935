"""Pieces on disk: the store (where bytes are written and verified) and the cache's garbage collector."""
