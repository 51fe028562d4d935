"""Seed-peer mode: a dfdaemon started with ``--seed``.

A seed announces itself as a super seed, has more upload slots and its own host id (the profile
in :mod:`common.hosts`), is triggered by the scheduler for new tasks through
``DfdaemonUpload.DownloadTask`` (:mod:`peer.services`), back-sources them and serves everyone
else. It runs the same code as every dfdaemon (:mod:`peer.daemon`); nothing else lives here yet.
"""
