"""A cluster backup: etcd's snapshot and what managers hold, in one file encrypted with the operator's passphrase.

The files (`snapshot.db`, `manifest.json` and the manager's files) are sealed by agent/pki/seal.py: AES-256-GCM
under a key made from the passphrase with scrypt.
"""

from __future__ import annotations

import base64
import json
from typing import BinaryIO

from agent.pki.seal import COST, BackupError, seal
from agent.pki.seal import unseal as _unseal
from agent.state.etcd import EtcdStateLog
from agent.state.log import StateLogError

__all__ = ["COST", "MANIFEST", "SNAPSHOT", "BackupError", "seal", "snapshot", "unseal"]

SNAPSHOT = "snapshot.db"
MANIFEST = "manifest.json"


def snapshot(log: EtcdStateLog, out: BinaryIO) -> int:
    """Stream etcd's snapshot (`/v3/maintenance/snapshot`, root with auth on) of the member `log` talks to into
    `out`; its size. The snapshot ends with etcd's SHA-256 of it, which `etcdctl snapshot restore` checks."""
    headers = log._headers()
    errors = []
    for endpoint in log.endpoints:
        try:
            with log._session.post(
                f"{endpoint}/v3/maintenance/snapshot", data="{}", headers=headers, stream=True, timeout=log.timeout
            ) as resp:
                if resp.status_code >= 400:
                    raise StateLogError(f"etcd refused the snapshot: {resp.text[:200]}")
                size = 0
                for line in resp.iter_lines():
                    if not line:
                        continue
                    doc = json.loads(line)
                    if "error" in doc:
                        raise StateLogError(f"etcd's snapshot failed: {doc['error'].get('message', doc['error'])}")
                    blob = base64.b64decode(doc.get("result", {}).get("blob") or "")
                    out.write(blob)
                    size += len(blob)
                return size
        except OSError as exc:  # requests' connection errors are OSErrors: try the next member
            errors.append(f"{endpoint}: {type(exc).__name__}")
    raise StateLogError("no etcd member gave a snapshot (" + "; ".join(errors) + ")")


def unseal(data: bytes, passphrase: bytes, source: str) -> dict[str, bytes]:
    """The files of a backup (agent.pki.seal.unseal), refusing one without the snapshot or the manifest."""
    files = _unseal(data, passphrase, source)
    if SNAPSHOT not in files or MANIFEST not in files:
        raise BackupError(f"{source}: the backup lacks {SNAPSHOT} or {MANIFEST}")
    return files
