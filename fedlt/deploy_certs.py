"""Certificates and SuperNode keys for a local deployment test (``python -m fedlt.deploy certs DIR``).

Writes, with the ``cryptography`` package (a dependency of Flower):

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority (the root the SuperNodes and ``flwr`` trust);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA, valid for the
  addresses ``127.0.0.1`` and ``localhost`` (plus any ``--host`` given);
- ``node-K`` / ``node-K.pub`` for K = 0..N-1: each SuperNode's authentication key pair (ECDSA P-384, OpenSSH
  format, as ``ssh-keygen -t ecdsa -b 384 -N ""`` writes it), the kind Flower 1.42's ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read.

Flower's own guide makes the same files with openssl / ssh-keygen (flwr ``examples/advanced-tensorflow/
certificates/generate.sh``, "Authenticate SuperNodes" in the Flower docs). These are for a test on one
machine: a real deployment's CA key stays with the SuperLink operator, and each node operator makes its own
key pair and hands over only the ``.pub`` file.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from fedlt.errors import FedLTError


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def make_certs(folder: str | Path, nodes: int = 2, hosts: tuple[str, ...] = ()) -> Path:
    """Write a CA, a server certificate for 127.0.0.1/localhost (+ ``hosts``) and ``nodes`` SuperNode key
    pairs into ``folder``; refuse to overwrite an existing CA (nothing is replaced silently)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # pragma: no cover - cryptography comes with flwr
        raise FedLTError("the 'cryptography' package is needed to make certificates (pip install cryptography)") \
            from exc

    out = Path(folder)
    if nodes < 1:
        raise FedLTError(f"--nodes {nodes}: make at least one SuperNode key pair")
    if out.exists() and not out.is_dir():
        raise FedLTError(f"{out} is a file, not a folder for the certificates")
    if (out / "ca.crt").exists():
        raise FedLTError(f"{out / 'ca.crt'} already exists: choose an empty folder (certificates are never replaced)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FedLTError(f"cannot make the certificate folder {out}: {exc.strerror or exc}") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM
    pkcs8 = (pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlt test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlt superlink")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    _write(out / "ca.key", ca_key.private_bytes(*pkcs8), private=True)
    _write(out / "ca.crt", ca.public_bytes(pem))
    _write(out / "server.key", key.private_bytes(*pkcs8), private=True)
    _write(out / "server.pem", cert.public_bytes(pem))
    for k in range(nodes):
        make_node_key(out / f"node-{k}")
    return out


def make_node_key(path: str | Path) -> Path:
    """A SuperNode's key pair: ``path`` (private, OpenSSH) and ``path.pub`` (the one line to register)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = Path(path)
    node_key = ec.generate_private_key(ec.SECP384R1())
    _write(path, node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()), private=True)
    _write(path.with_name(path.name + ".pub"),
           node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
           + b"\n")
    return path
