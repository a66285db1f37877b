"""The cluster's public-key infrastructure: its certificate authority, node keys and certificates, and the checks a
node makes of another's certificate. The only package that may import `cryptography`.

- `ca`: the root CA (ECDSA P-256, 20 years), node keys and CSRs, signing behind the small `Signer` interface (the
  manager's `LocalSigner` holds the CA key; an external CA or a signer that checks revocation can take its place),
  and `identify`, which reads a node certificate's id, role and cluster and refuses one the cluster CA did not
  issue, one out of its validity window or one that is itself a CA.
- `files`: where a node keeps them under its state directory (`<state_dir>/pki/`, 0700; keys 0600) and the TLS
  contexts built from them.

A node certificate names its node (subject CN and a DNS SAN: the node id), its role (subject OU: `manager` or
`worker`, checked by whoever it is shown to) and its cluster (subject O: the cluster id); with an advertise address,
that address is an IP SAN. When to renew is a pure planner (`reconcilers.certificates`).
"""
