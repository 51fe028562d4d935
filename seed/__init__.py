"""Seed-peer mode: a dfdaemon that registers as a seed host and back-sources on trigger."""
