"""Certificates and keys for the secure profile of an SSFL Flower deployment.

    python -m ssfl.flower.certs OUT_DIR [--host 10.0.0.5 --host link.example.org] [--supernodes 3]

writes, with Python's ``cryptography`` (no openssl needed):

* ``ca.crt`` / ``ca.key``: a private certificate authority (keep ``ca.key`` offline);
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  127.0.0.1, ::1, localhost and every ``--host``;
* ``supernode-<i>`` / ``supernode-<i>.pub``: one EC P-384 key pair per SuperNode in OpenSSH
  format, for SuperNode authentication (the SuperLink accepts only registered public keys).

Then: ``flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
server.key --enable-supernode-auth``; ``flwr supernode register supernode-<i>.pub <connection>``
for each SuperNode; ``flower-supernode --root-certificates ca.crt --auth-supernode-private-key
supernode-<i> ...``. docs/flower.md has the whole sequence.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ssfl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey,
               fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def make_certificates(
    out: Path, hosts: Sequence[str] = (), num_supernodes: int = 0, days: int = 365
) -> dict[str, Path]:
    """Write the CA, the SuperLink certificate and ``num_supernodes`` SuperNode key pairs."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("ssfl CA")).issuer_name(_name("ssfl CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0] if hosts else "localhost")).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    paths = {"ca.crt": out / "ca.crt", "ca.key": out / "ca.key",
             "server.pem": out / "server.pem", "server.key": out / "server.key"}
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca.key"], ca_key)
    paths["server.pem"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server.key"], server_key)
    for i in range(num_supernodes):
        paths.update(make_supernode_keys(out, f"supernode-{i}"))
    return paths


def make_supernode_keys(out: Path, name: str) -> dict[str, Path]:
    """An EC P-384 key pair in OpenSSH format: ``<name>`` (private) and ``<name>.pub``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    _write_key(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return {name: private, f"{name}.pub": public}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssfl.flower.certs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write to")
    parser.add_argument("--host", action="append", default=[],
                        help="address or name the SuperNodes use to reach the SuperLink "
                             "(repeatable; 127.0.0.1 and localhost are always included)")
    parser.add_argument("--supernodes", type=int, default=0, help="SuperNode key pairs to make")
    parser.add_argument("--days", type=int, default=365)
    args = parser.parse_args(argv)
    paths = make_certificates(Path(args.out), args.host, args.supernodes, args.days)
    for name, path in paths.items():
        print(f"{name:16s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
