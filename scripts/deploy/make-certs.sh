#!/usr/bin/env bash
# Make a private CA and a TLS certificate for the SuperLink, signed by that CA.
#
#   scripts/deploy/make-certs.sh HOST_OR_IP [OUT_DIR]      (OUT_DIR defaults to ./certs)
#
# HOST_OR_IP is the name or address the SuperNodes and `flwr` use to reach the SuperLink
# (e.g. superlink.example.org or 10.0.0.5). The certificate also covers 127.0.0.1, ::1 and
# localhost: the SuperLink's own SuperExec (which starts the ServerApp) connects to it over
# loopback and verifies it with the same CA, so these names are not optional.
#
# Writes to OUT_DIR:
#   ca.crt       the CA certificate: copy it to every SuperNode machine and to the machine that
#                runs `flwr` (--root-certificates / root-certificates in config.toml)
#   ca.key       the CA's private key: keep it safe (offline); only needed to sign new certs
#   server.pem   the SuperLink's certificate (--ssl-certfile)
#   server.key   the SuperLink's private key (--ssl-keyfile): stays on the SuperLink machine
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 || "$1" == -* ]]; then
  echo "usage: $0 HOST_OR_IP [OUT_DIR]" >&2
  exit 2
fi
host="$1"
out="${2:-certs}"
days="${CERT_DAYS:-365}"
if ! command -v openssl >/dev/null; then
  echo "error: openssl not found (apt-get install openssl)" >&2
  exit 1
fi

# An IPv4/IPv6 address goes into the SAN as IP:, anything else as DNS:.
if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then
  san="IP:$host"
else
  san="DNS:$host"
fi
san="$san,IP:127.0.0.1,IP:::1,DNS:localhost"

mkdir -p "$out"
umask 077  # private keys readable by the owner only
cd "$out"

# 1. The CA: a self-signed certificate allowed to sign others.
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" \
  -keyout ca.key -out ca.crt -subj "/CN=FedDM Flower CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# 2. The SuperLink's key and certificate request, then the certificate signed by the CA.
openssl req -newkey rsa:3072 -nodes -sha256 \
  -keyout server.key -out server.csr -subj "/CN=$host" 2>/dev/null
extensions="$(mktemp)"
trap 'rm -f "$extensions" server.csr ca.srl' EXIT
cat >"$extensions" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid,issuer
subjectAltName=$san
EXT
openssl x509 -req -sha256 -days "$days" -in server.csr \
  -CA ca.crt -CAkey ca.key -CAcreateserial -extfile "$extensions" -out server.pem 2>/dev/null
chmod 644 ca.crt server.pem

openssl verify -CAfile ca.crt server.pem >/dev/null
echo "Wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key} for $san (valid $days days)"
