"""The per-node daemon (dfdaemon): storage, piece server, download engine, proxy and dfget."""
