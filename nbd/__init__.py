"""The array's NBD port (issue 15): the NBD protocol over the same array, write barrier
and LUN masking as the FUSE mount, optionally behind TLS with X.509 host identities.
docs/network.md is the user's description; the server's: server.py (listening, the
handshake, masking), transmission.py (the requests), connection.py (the byte stream)."""
