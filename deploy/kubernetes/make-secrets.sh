#!/usr/bin/env bash
# Write the files the kustomization turns into Secrets, under secrets/ next to this script (or DIR):
#   cluster-token         the token routers and agents send to engines (engines run --api-keys <token>)
#   api-keys              client API keys for the routers, comma separated (add your own; no newline)
#   etcd-ca.crt/.key      a private CA for etcd (keep etcd-ca.key offline; it is never put in a Secret)
#   etcd-server.crt/.key  the etcd members' certificate (server and peer), names etcd-N.etcd[.NS.svc...]
#   etcd-client.crt/.key  the certificate distserve presents to etcd (mutual TLS)
# Idempotent: existing files are kept (rotate by deleting them). Needs openssl.
# Usage: make-secrets.sh [-n NAMESPACE] [-d DIR] [--members N]
set -euo pipefail
NS=distserve
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/secrets"
MEMBERS=3
DAYS=825
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--namespace) NS="$2"; shift 2 ;;
    -d|--dir) DIR="$2"; shift 2 ;;
    --members) MEMBERS="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "make-secrets.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null || { echo "make-secrets.sh: openssl is required" >&2; exit 1; }
mkdir -p "$DIR"
chmod 700 "$DIR"
cd "$DIR"
umask 077
log() { echo "[make-secrets] $*" >&2; }

[ -s cluster-token ] || { printf "%s" "$(openssl rand -hex 32)" > cluster-token; log "wrote cluster-token"; }
[ -s api-keys ] || { printf "%s" "sk-$(openssl rand -hex 24)" > api-keys; log "wrote api-keys (one key; append ,KEY for more)"; }

if [ ! -s etcd-ca.key ]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days 3650 -subj "/CN=distserve-etcd-ca" \
    -keyout etcd-ca.key -out etcd-ca.crt 2>/dev/null
  log "wrote etcd-ca.crt and etcd-ca.key (keep the key offline)"
fi

issue() {  # issue NAME CN EXTENDED_KEY_USAGE SAN
  local name="$1" cn="$2" eku="$3" san="$4"
  [ -s "$name.key" ] && [ -s "$name.crt" ] && return 0
  local ext; ext="$(mktemp)"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -n "$san" ] && echo "subjectAltName=$san"
  } > "$ext"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA etcd-ca.crt -CAkey etcd-ca.key -CAcreateserial -days "$DAYS" \
    -sha256 -extfile "$ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$ext"
  log "wrote $name.crt and $name.key"
}

san="DNS:etcd,DNS:etcd.$NS,DNS:etcd.$NS.svc,DNS:localhost,IP:127.0.0.1"
for i in $(seq 0 $((MEMBERS - 1))); do
  san="$san,DNS:etcd-$i.etcd,DNS:etcd-$i.etcd.$NS,DNS:etcd-$i.etcd.$NS.svc,DNS:etcd-$i.etcd.$NS.svc.cluster.local"
done
# One certificate for both roles: members present it to clients (serverAuth) and to peers (both).
issue etcd-server etcd "serverAuth,clientAuth" "$san"
issue etcd-client distserve "clientAuth" ""
rm -f etcd-ca.srl
chmod 600 ./*
