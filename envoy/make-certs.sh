#!/usr/bin/env bash
# Makes the certificates for the sidecar's HTTPS/mTLS listener (envoy/README.md, "HTTPS and
# mTLS"), with openssl, the way thin-edge's device seed does it: a local CA, a server
# certificate for the listener, and one client certificate per device whose subject CN is the
# device id (token-auth's `"mtls": {"identity_from": "subject_cn"}` reads it).
#
#   envoy/make-certs.sh OUT_DIR [DEVICE_ID ...]      (default device: lamp-01)
#
# OUT_DIR gets (keys mode 600):
#   ca.crt, ca.key                  the CA: --client-ca for render.py; clients verify the server with it
#   server.crt, server.key          the listener's certificate (SAN: $SERVER_SAN) and key
#   <device>.crt, <device>.key      a device's client certificate (CN=<device>, clientAuth)
#   other-ca.crt, other-ca.key      a second, unrelated CA (for negative tests)
#   other-ca-<device>.crt/.key      a client certificate with the same CN, signed by the other CA:
#                                   the listener must refuse it
#
# Run again with more device ids to add devices: an existing CA (ca.key) and server
# certificate are reused, never overwritten; an existing device certificate is kept.
#
# Environment: SERVER_SAN (default "DNS:localhost,IP:127.0.0.1"), SERVER_CN (default
# "iot-sidecar"), DAYS (device and server validity, default 365), CA_DAYS (default 3650).
# Keys are EC P-256. Real deployments keep ca.key offline; this script is for local set-ups
# and tests.
set -euo pipefail

if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
out=$1
shift
devices=("$@")
[ ${#devices[@]} -gt 0 ] || devices=(lamp-01)

SERVER_SAN=${SERVER_SAN:-DNS:localhost,IP:127.0.0.1}
SERVER_CN=${SERVER_CN:-iot-sidecar}
DAYS=${DAYS:-365}
CA_DAYS=${CA_DAYS:-3650}

for d in "${devices[@]}"; do
  # The id becomes a CN and a file name: keep it to what device ids are.
  if ! [[ $d =~ ^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$ ]]; then
    echo "make-certs.sh: device id '$d': use letters, digits, '.', '_', ':' or '-'" >&2
    exit 2
  fi
done

command -v openssl >/dev/null || { echo "make-certs.sh: openssl is not installed" >&2; exit 1; }
mkdir -p "$out"
umask 077
tmp=$(mktemp -d "$out/.make-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

newkey() {  # newkey FILE
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
}

make_ca() {  # make_ca NAME CN
  local name=$1 cn=$2
  [ -f "$out/$name.key" ] && [ -f "$out/$name.crt" ] && return 0
  newkey "$tmp/$name.key"
  openssl req -x509 -new -key "$tmp/$name.key" -sha256 -days "$CA_DAYS" \
    -subj "/O=IoT policy sidecar/CN=$cn" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$tmp/$name.crt"
  mv "$tmp/$name.key" "$out/$name.key"
  mv "$tmp/$name.crt" "$out/$name.crt"
  chmod 644 "$out/$name.crt"
}

issue() {  # issue CA_NAME OUT_NAME CN EXTENSIONS
  local ca=$1 name=$2 cn=$3 ext=$4
  [ -f "$out/$name.key" ] && [ -f "$out/$name.crt" ] && return 0
  newkey "$tmp/$name.key"
  openssl req -new -key "$tmp/$name.key" -subj "/O=IoT policy sidecar/CN=$cn" \
    -out "$tmp/$name.csr"
  printf '%b' "$ext" > "$tmp/$name.ext"
  openssl x509 -req -in "$tmp/$name.csr" -CA "$out/$ca.crt" -CAkey "$out/$ca.key" \
    -CAcreateserial -CAserial "$tmp/$ca.srl" -sha256 -days "$DAYS" \
    -extfile "$tmp/$name.ext" -out "$tmp/$name.crt" 2>/dev/null
  mv "$tmp/$name.key" "$out/$name.key"
  mv "$tmp/$name.crt" "$out/$name.crt"
  chmod 644 "$out/$name.crt"
}

common_ext="authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature"

make_ca ca "IoT policy sidecar local CA"
make_ca other-ca "Some other CA"

issue ca server "$SERVER_CN" "$common_ext\nextendedKeyUsage=serverAuth\nsubjectAltName=$SERVER_SAN\n"
for d in "${devices[@]}"; do
  issue ca "$d" "$d" "$common_ext\nextendedKeyUsage=clientAuth\n"
  issue other-ca "other-ca-$d" "$d" "$common_ext\nextendedKeyUsage=clientAuth\n"
done

# Check what was made: the chain of every certificate verifies against its own CA.
openssl verify -CAfile "$out/ca.crt" -purpose sslserver "$out/server.crt" >/dev/null
for d in "${devices[@]}"; do
  openssl verify -CAfile "$out/ca.crt" -purpose sslclient "$out/$d.crt" >/dev/null
  openssl verify -CAfile "$out/other-ca.crt" -purpose sslclient "$out/other-ca-$d.crt" >/dev/null
done
echo "make-certs.sh: CA, server and device certificates (${devices[*]}) in $out"
