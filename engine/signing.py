"""Ed25519 signatures over an artifact's metadata (`cryptography`; no crypto of our own).

An artifact's metadata lists every tensor's sha256 and a digest of every other field, so a
signature over the metadata covers the whole file: `artifact.read` checks each tensor against its
listed digest, and the signature proves who wrote the list. The signature lives beside the metadata
in the safetensors header (key `sparse_engine_signature`), as JSON
`{"alg": "ed25519", "key_id": <first 16 hex of sha256 of the raw public key>, "signature": <base64>}`,
over `PREFIX + canonical JSON of the metadata` (sorted keys, no spaces).

`sparse-engine keygen -o NAME` writes NAME.key (private, PKCS#8 PEM, mode 0600) and NAME.pub
(public, PEM); `convert --sign-key NAME.key` signs; `engine.load(path, verify_key="NAME.pub")`,
`run/serve --verify-key NAME.pub` refuse an unsigned, mis-signed or edited artifact.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from pathlib import Path

SIGNATURE_KEY = "sparse_engine_signature"
PREFIX = b"sparse-engine artifact metadata v1\n"  # domain separation: these bytes sign nothing else


class SignatureError(ValueError):
    """A key file is unusable, or an artifact's signature is missing or does not verify."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise SignatureError("signing needs the 'cryptography' package: pip install "
                             "'sparse-engine[serve]' (or pip install cryptography)") from e
    return serialization, ed25519


def payload(meta: dict) -> bytes:
    """The bytes a signature covers: the metadata as canonical JSON."""
    return PREFIX + json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private(key):
    """An Ed25519PrivateKey, or the path of a PEM file holding one."""
    serialization, ed25519 = _crypto()
    return _load_key(key, ed25519.Ed25519PrivateKey, "signing key", "an unencrypted PEM private key (write "
                     "one with `sparse-engine keygen`)", lambda data: serialization.load_pem_private_key(data, None))


def load_public(key):
    """An Ed25519PublicKey, or the path of a PEM file holding one."""
    serialization, ed25519 = _crypto()
    return _load_key(key, ed25519.Ed25519PublicKey, "verify key", "a PEM public key",
                     serialization.load_pem_public_key)


def _load_key(key, cls, role: str, expected: str, parse):
    if isinstance(key, cls):
        return key
    try:
        data = Path(key).read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read the {role} file {str(key)!r}: {e.strerror}") from None
    try:
        loaded = parse(data)
    except (ValueError, TypeError) as e:
        private_for_public = role == "verify key" and b"PRIVATE KEY" in data
        hint = " (this is a private key: pass the .pub file)" if private_for_public else ""
        raise SignatureError(f"{role} {str(key)!r} is not {expected}{hint}: {e}") from None
    if not isinstance(loaded, cls):
        raise SignatureError(f"{role} {str(key)!r} is a {type(loaded).__name__}, not Ed25519")
    return loaded


def sign(meta: dict, private_key) -> str:
    """The header value (a JSON string) signing `meta` with `private_key` (key or PEM path)."""
    private = load_private(private_key)
    signature = private.sign(payload(meta))
    return json.dumps({"alg": "ed25519", "key_id": key_id(private.public_key()),
                       "signature": base64.b64encode(signature).decode()})


def verify(fn: str, meta: dict, header_value: str | None, public_key) -> None:
    """Raises SignatureError naming `fn` unless `header_value` is a valid signature of `meta` by
    `public_key` (key or PEM path)."""
    from cryptography.exceptions import InvalidSignature

    public = load_public(public_key)
    if header_value is None:
        raise SignatureError(f"{fn}: the artifact is not signed, and a verify key was given: refusing "
                             "it (sign it with `sparse-engine convert --sign-key`)")
    try:
        doc = json.loads(header_value)
        alg, kid, signature = doc["alg"], doc["key_id"], base64.b64decode(doc["signature"], validate=True)
    except (ValueError, TypeError, KeyError) as e:
        raise SignatureError(f"{fn}: the signature entry is malformed ({type(e).__name__}: {e})") from None
    if alg != "ed25519":
        raise SignatureError(f"{fn}: signature algorithm {alg!r} is not supported (ed25519 only)")
    if kid != key_id(public):
        raise SignatureError(f"{fn}: signed by key {kid}, not by the verify key {key_id(public)}: refusing it")
    try:
        public.verify(signature, payload(meta))
    except InvalidSignature:
        raise SignatureError(f"{fn}: the signature does not match the metadata: the artifact was edited "
                             "after it was signed") from None


def keygen(name: str | os.PathLike) -> tuple[Path, Path]:
    """Writes NAME.key (private, mode 0600) and NAME.pub; refuses to overwrite either."""
    serialization, ed25519 = _crypto()
    private_path, public_path = Path(f"{name}.key"), Path(f"{name}.pub")
    for p in (private_path, public_path):
        if p.exists():
            raise SignatureError(f"keygen: {p} already exists; not overwriting a key")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


# ----------------------------------------------------------------------------- the `keygen` verb

def configure(parser) -> None:
    parser.add_argument("-o", "--output", required=True, metavar="NAME",
                        help="writes NAME.key (private, keep it secret) and NAME.pub (give to servers)")


def main(args) -> int:
    try:
        private_path, public_path = keygen(args.output)
    except (SignatureError, OSError) as e:
        print(f"sparse-engine keygen: {e}", file=sys.stderr)
        return 1
    print(f"wrote {private_path} (private: sign with `convert --sign-key {private_path}`) and "
          f"{public_path} (public: `serve --verify-key {public_path}`)")
    return 0
