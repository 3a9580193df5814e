"""A cluster's one secret and what every node derives from it: Ray's authentication token, a
certificate authority, and the node's own certificate for Ray's TLS.

The join line carries only the head's address and the secret. Each node rebuilds the same
authority from the secret (its key is derived, its certificate made again: same name, same
key), then signs a certificate for its own addresses. So nothing but that line passes between
machines, and a node without the secret can neither join (no token) nor talk to one (no
certificate the others accept). The token Ray sends is derived apart from the authority's key:
whoever sees it cannot sign.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP256R1()
SECRET_BYTES = 32


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def _derived(secret: str, purpose: str, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=f"shardwise {purpose}".encode()).derive(secret.encode())


def ray_token(secret: str) -> str:
    return _derived(secret, "ray token", 32).hex()


def _authority(secret: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256's group order
    scalar = int.from_bytes(_derived(secret, "cluster authority", 48)) % (order - 1) + 1
    key = ec.derive_private_key(scalar, CURVE)
    public = key.public_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shardwise cluster authority")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(public)
                   .serial_number(int.from_bytes(_derived(secret, "authority serial", 16)) >> 1)
                   .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
                   .not_valid_after(datetime.datetime(2125, 1, 1, tzinfo=datetime.UTC))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                  critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                   .sign(key, hashes.SHA256()))
    return key, certificate


def node_certificate(secret: str, addresses: list[str]) -> tuple[bytes, bytes, bytes]:
    """(the authority's certificate, this node's certificate, its key), PEM: valid for `addresses`
    (IPs, also written as names, as gRPC may match either) and this machine's own names."""
    authority_key, authority = _authority(secret)
    key = ec.generate_private_key(CURVE)
    names: list[x509.GeneralName] = []
    for address in dict.fromkeys([*addresses, "127.0.0.1", "localhost", socket.gethostname()]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            pass
        names.append(x509.DNSName(address))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"shardwise node {addresses[0]}")]))
                   .issuer_name(authority.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=3650))
                   .add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key.public_key()),
                                  critical=False)
                   .sign(authority_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    return (authority.public_bytes(pem), certificate.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))

