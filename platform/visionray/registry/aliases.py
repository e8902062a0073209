"""Signed alias records: where ``<name>/aliases/<alias>`` points, signed by the key that moved it."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


from visionray.registry.keys import check_public_key, key_fingerprint, public_key_of
from visionray.registry.layout import ALIAS_FORMAT, ENV_VERIFY_KEYS, VerificationError



class AliasRecord(BaseModel):
    """What ``<name>/aliases/<alias>`` holds: where the alias points, signed by the key that moved
    it. Aliases move after a version is signed, so the version's own signature cannot name them;
    signing the move itself means whoever can write the storage (whom signatures must stop) cannot
    repoint ``production`` at another version. Loading by alias verifies this record first."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["visionray-alias/1"] = ALIAS_FORMAT
    name: str
    alias: str
    version: int = Field(ge=1)
    promoted: str
    signer: str | None = None
    signature: str | None = None  # base64 ECDSA-P256-SHA256 over ``payload()``

    def payload(self) -> bytes:
        return json.dumps(self.model_dump(exclude={"signature"}), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, text: str, name: str, alias: str) -> "AliasRecord | None":
        """The record, or None when the text is none; a bare version number (aliases before they
        were signed) reads as an unsigned record."""
        if text.strip().isdigit():
            return cls(name=name, alias=alias, version=int(text.strip()), promoted="")
        try:
            return cls.model_validate_json(text)
        except ValueError:
            return None


def sign_alias(name: str, alias: str, version: int, private_key: Path | None) -> AliasRecord:
    """A new record for ``alias`` -> ``version``, signed with ``private_key`` (None: unsigned)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    promoted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if private_key is None:
        return AliasRecord(name=name, alias=alias, version=version, promoted=promoted)
    signer = key_fingerprint(public_key_of(private_key))
    unsigned = AliasRecord(name=name, alias=alias, version=version, promoted=promoted, signer=signer)
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    signature = key.sign(unsigned.payload(), ec.ECDSA(hashes.SHA256()))
    return unsigned.model_copy(update={"signature": base64.b64encode(signature).decode()})


def verify_alias(record: AliasRecord, name: str, alias: str, public_keys: list[Path]) -> str:
    """The fingerprint of the trusted key that signed ``record``; ``VerificationError`` otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    label = f"{name}@{alias}"
    if (record.name, record.alias) != (name, alias):
        raise VerificationError(f"{label}: its alias file says {record.name}@{record.alias}: copied from elsewhere; "
                                f"move it with `visionray models promote {name}@N {alias} --key KEY`")
    if not record.signature:
        raise VerificationError(f"{label} is not signed (moved without a signing key, by hand, or before aliases were "
                                f"signed); re-point it with `visionray models promote {name}@{record.version} {alias} "
                                f"--key KEY`, or load {name}@{record.version} by its version")
    if not public_keys:
        raise VerificationError(f"{label}: no public key to verify the alias with; pass the signer's .pub with "
                                f"--public-key or set {ENV_VERIFY_KEYS}")
    try:
        signature = base64.b64decode(record.signature, validate=True)
    except ValueError:
        raise VerificationError(f"{label}: the alias signature is not base64") from None
    for path in public_keys:
        check_public_key(path)
        key = serialization.load_pem_public_key(path.read_bytes())
        if not isinstance(key, ec.EllipticCurvePublicKey):
            continue
        try:
            key.verify(signature, record.payload(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return key_fingerprint(key)
    raise VerificationError(f"{label}: the alias record (-> v{record.version}) is not signed by a trusted key: moved "
                            "by someone else, or edited; do not load it by this alias")
