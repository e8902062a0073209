"""Signing keys: EC P-256 pairs for model-signing, their fingerprints and checks."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from visionray.registry.layout import RegistryError, VerificationError, storage_error

def generate_keys(prefix: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write an EC P-256 key pair: ``<prefix>.key`` (PKCS#8 PEM, mode 0600) and ``<prefix>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    prefix = Path(prefix)
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    if not overwrite:
        for path in (private, public):
            if path.exists():
                raise RegistryError(f"{path} exists; choose another prefix or pass --force to replace the pair")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    written = False
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and private.exists():
            private.unlink()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        written = True
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.chmod(private, 0o600)  # in case a umask or an odd filesystem widened it
        public.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    except OSError as exc:
        if written:  # never leave half a pair (or a truncated private key) behind
            private.unlink(missing_ok=True)
        raise storage_error(exc, f"cannot write the key pair {private} / {public}") from None
    return private, public


def public_key_of(private_key: Path):
    """The public half of a PEM private key file, checked to be an EC key that model-signing accepts."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise RegistryError(f"signing key {private_key} does not exist; create one with `visionray keys generate`") from None
    except (OSError, ValueError, TypeError) as exc:
        raise RegistryError(f"signing key {private_key}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RegistryError(f"signing key {private_key}: a {type(key).__name__}; model signing needs an EC key "
                            "(P-256, from `visionray keys generate`)")
    return key.public_key()


def key_fingerprint(public_key: Any) -> str:
    """``sha256:<hex>`` of the DER SubjectPublicKeyInfo: names a key in metadata and messages."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def check_public_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    try:
        serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise VerificationError(f"public key {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise VerificationError(f"public key {path}: not a PEM public key ({exc}); pass the .pub file, "
                                "not the private key") from None


# --------------------------------------------------------------------------- signing
