"""Downloading a task: the pure policy (which piece, which parent, when to give up on parents),
the engine that carries it out, the request every entry point shares, and the scheduler stream."""
