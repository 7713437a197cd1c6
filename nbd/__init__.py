"""The array's network port: NBD over TLS (issue 15) -- certificates and TLS contexts."""
