"""The registry mirror and HTTP proxy: the server, the private-blob access check, HTTPS interception."""
