"""The listening port: plaintext, TLS (TLS_CERT_FILE + TLS_KEY_FILE) or mutual TLS (also TLS_CLIENT_CA_FILE,
which makes every client present a certificate that this CA signed), SPEC §13."""

from __future__ import annotations

import ipaddress
import ssl
from typing import Callable

import grpc

from opd_grpc.settings import Settings, SettingsError


def bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    """Adds the port of `listen` to `server`, with TLS when there are `credentials`, and answers the port bound
    (the free one taken for :0)."""
    try:
        if credentials is not None:
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError:  # grpcio raises where older versions answered port 0
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen} (LISTEN): the port is in use, or the address is not one of this "
                      "machine's")
    return port


def is_loopback(listen: str) -> bool:
    """Whether a LISTEN address (host:port, [v6]:port, or a bare host) is reachable from this machine only:
    127.0.0.0/8, ::1 or localhost. 0.0.0.0, [::], an empty host and other names listen beyond it."""
    host = _host(listen)
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host(listen: str) -> str:
    if listen.startswith("["):
        return listen[1:].partition("]")[0]
    try:
        ipaddress.ip_address(listen)  # a bare IPv6 address such as ::1: its last colon is not a port's
        return listen
    except ValueError:
        return listen.rpartition(":")[0] if ":" in listen else listen


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The TLS credentials of the settings, None for plaintext. The PEM files are read and checked here, before the
    server touches its database: gRPC itself would only say "failed to bind" for a key that does not match its
    certificate, and a wrong path must stop the server with a message naming the setting."""
    if not settings.TLS_CERT_FILE:
        return None
    cert_file, key_file, ca_file = settings.TLS_CERT_FILE, settings.TLS_KEY_FILE, settings.TLS_CLIENT_CA_FILE
    chain = _read("TLS_CERT_FILE", cert_file)
    key = _read("TLS_KEY_FILE", key_file)
    client_ca = _read("TLS_CLIENT_CA_FILE", ca_file) if ca_file else None
    _check_certificates("TLS_CERT_FILE", cert_file)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=_encrypted(key_file))
    except ssl.SSLError as exc:
        raise SettingsError(f"TLS_KEY_FILE: {key_file} is not the private key of the certificate in {cert_file} "
                            f"(TLS_CERT_FILE): {exc.reason or exc}") from exc
    if ca_file:
        _check_certificates("TLS_CLIENT_CA_FILE", ca_file)
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _read(setting: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise SettingsError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from exc


def _check_certificates(setting: str, path: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise SettingsError(f"{setting}: {path} holds no PEM certificate: {exc.reason or exc}") from exc


def _encrypted(key_file: str) -> Callable[[], str]:
    """OpenSSL's password callback: gRPC cannot use an encrypted key, so say so rather than prompt for one."""
    def refuse() -> str:
        raise SettingsError(f"TLS_KEY_FILE: {key_file} is encrypted; gRPC needs the key without a passphrase")
    return refuse
