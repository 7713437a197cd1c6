"""The array's NBD port (issue 15): the NBD protocol over the same array, write barrier
and LUN masking as the FUSE mount, optionally behind TLS with X.509 host identities.
docs/network.md is the user's description; server.py the protocol's."""
