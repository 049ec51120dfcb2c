"""A kernel pod's TLS identity: its own certificate and key, and its owner's token.

Made by the service for each kernel and given to two parties only: the kernel pod
(its Secret) and the owner's server (the service's answer). The server trusts that
certificate alone (pinned, not a CA's), so no other pod can pose as the kernel; the
agent takes only a client that sends the token first, so no other pod can drive the
kernel, even where the cluster does not enforce NetworkPolicy. Neither is worth
anything beyond this one kernel: the kernel may read both (they are in its pod).
"""

from __future__ import annotations

import base64
import datetime
import secrets
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TOKEN_BYTES = 32
"""As the agent expects (agent.TOKEN_BYTES)."""
VALIDITY = datetime.timedelta(days=400)
"""A kernel may live long; the certificate is pinned, not checked against a CA's lifetime."""


@dataclass(frozen=True)
class Credentials:
    certificate: str
    """PEM."""
    server_name: str
    """The certificate's one DNS name: what the server checks it for."""
    token: bytes
    key: str = ""
    """PEM; only the service and the kernel's Secret hold it (empty at the server)."""

    def secret_data(self) -> dict[str, str]:
        """The kernel Secret's `data` (agent.listen_tls reads these files)."""

        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        return {"tls.crt": b64(self.certificate), "tls.key": b64(self.key),
                "token": b64(self.token.hex())}  # fmt: skip

    def client_context(self) -> ssl.SSLContext:
        """A TLS client context that trusts this kernel's certificate and nothing else."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_verify_locations(cadata=self.certificate)
        return context

    def public(self) -> dict[str, str]:
        """What the owner's server gets: everything but the key."""
        return {"certificate": self.certificate, "server_name": self.server_name,
                "token": self.token.hex()}  # fmt: skip


def make(name: str) -> Credentials:
    """Fresh credentials for the kernel whose objects are called `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    server_name = f"{name}.kernel.jupyter-sandbox"
    # the name is in the SAN (a common name holds 64 characters only)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jupyter-sandbox kernel")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(server_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Credentials(
        certificate=certificate.public_bytes(serialization.Encoding.PEM).decode(),
        server_name=server_name,
        token=secrets.token_bytes(TOKEN_BYTES),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode(),
    )


def from_public(answer: dict) -> Credentials:
    """The server's copy, from the service's answer (ValueError if malformed)."""
    try:
        certificate, server_name = str(answer["certificate"]), str(answer["server_name"])
        token = bytes.fromhex(str(answer["token"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed kernel credentials: {e}") from None
    if len(token) != TOKEN_BYTES or not certificate.startswith("-----BEGIN CERTIFICATE-----"):
        raise ValueError("malformed kernel credentials")
    x509.load_pem_x509_certificate(certificate.encode())  # ValueError if it is not one
    return Credentials(certificate=certificate, server_name=server_name, token=token)
