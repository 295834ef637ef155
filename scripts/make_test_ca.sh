#!/usr/bin/env bash
# Certificates for trying TLS and mutual TLS on one machine, never for production: a test CA (ca.pem, ca.key),
# a server certificate for localhost and 127.0.0.1 (server.pem, server.key), a client certificate
# (client.pem, client.key), and a client certificate from a second CA that nobody trusts
# (untrusted-client.pem, untrusted-client.key): what a stranger would present. EC P-256 keys, valid 30 days.
#
#   bash scripts/make_test_ca.sh certs
#
# Running it again makes everything afresh, which also renews expired certificates.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
mkdir -p "$1"
cd "$1"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
days=30

quiet() {  # runs a command silently, but shows its output if it fails
  local out
  out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
}

key() {  # key FILE: a new EC P-256 private key, readable by its owner only
  (umask 077 && quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1")
}

ca() {  # ca PATH: a self-signed CA certificate PATH.pem and its key PATH.key
  key "$1.key"
  quiet openssl req -x509 -new -key "$1.key" -sha256 -days "$days" -subj "/CN=opd-grpc test $(basename "$1")" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$1.pem"
}

leaf() {  # leaf NAME CA_PATH EXTENSION...: NAME.pem and NAME.key, signed by CA_PATH.pem
  local name=$1 issuer=$2
  shift 2
  key "$name.key"
  quiet openssl req -new -key "$name.key" -subj "/CN=opd-grpc test $name" -out "$work/$name.csr"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" "$@" > "$work/$name.ext"
  quiet openssl x509 -req -in "$work/$name.csr" -CA "$issuer.pem" -CAkey "$issuer.key" -sha256 -days "$days" \
    -extfile "$work/$name.ext" -out "$name.pem"
}

ca ca
leaf server ca "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1"
leaf client ca "extendedKeyUsage=clientAuth"
ca "$work/untrusted-ca"
leaf untrusted-client "$work/untrusted-ca" "extendedKeyUsage=clientAuth"
