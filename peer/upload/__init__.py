"""Serving pieces to other peers: the HTTP piece server (sendfile, upload slots, rate limit)."""
