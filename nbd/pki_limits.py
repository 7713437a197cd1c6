"""The certificates' validity and name limits (nbd/pki.py makes the certificates and
re-exports these): a module of its own, without the `cryptography` import, because the
CLI's parser shows them in `pki init/host --help` and every command builds the parser
(its start-up time)."""

from __future__ import annotations

CA_DAYS = 3650      # the CA's validity (10 years)
LEAF_DAYS = 730     # a server or host certificate's default validity (2 years)
# X.509's upper bound for a commonName (ub-common-name, RFC 5280 appendix A)
CN_MAX = 64
