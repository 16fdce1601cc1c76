# Shared shell helpers for the project's scripts. Source, do not run.

# Installs SoftHSM2 from the distribution when its module is missing.
ensure_softhsm() {
  if [ -z "$(softhsm_module)" ] || ! command -v softhsm2-util > /dev/null; then
    echo "==> installing softhsm2"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq softhsm2 > /dev/null
  fi
}

# Prints the path of the SoftHSM2 PKCS#11 module, or nothing.
softhsm_module() {
  local candidate
  for candidate in "${KMS_HSM_MODULE:-}" /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -n "$candidate" ] && [ -f "$candidate" ]; then echo "$candidate"; return; fi
  done
}

# Prints a free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Starts kms-server (release build in ./target/release) on a fresh SoftHSM2 token with random
# PINs, a fresh SQLite database and a fresh development PKI (`kms-cli pki init`), all in folder
# $1 (recreated), on a free loopback port, serving mutual TLS only.
# Exports SOFTHSM2_CONF, KMS_ENDPOINT (https://), KMS_PKI (the PKI folder), KMS_IDENTITY
# (app-1; pass `--identity "$KMS_PKI/officer-1"` etc. for another role), SERVER_PID and BIN;
# stops the server on exit.
start_kms_server() {
  local state="$1"
  BIN="$PWD/target/release"
  echo "==> fresh SoftHSM2 token and SQLite database in $state"
  rm -rf "$state"
  mkdir -p "$state/tokens"
  chmod 700 "$state"
  export SOFTHSM2_CONF="$state/softhsm2.conf"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$state/tokens" > "$SOFTHSM2_CONF"
  # Random PINs, readable by the owner only; the server reads the user PIN from its file.
  (
    umask 077
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/user.pin"
    head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$state/so.pin"
  )
  softhsm2-util --init-token --free --label kms-demo \
    --so-pin "$(cat "$state/so.pin")" --pin "$(cat "$state/user.pin")" > /dev/null

  echo "==> development PKI (CA, server and one client certificate per role) in $state/pki"
  "$BIN/kms-cli" pki init --out "$state/pki" > "$state/pki.txt"
  export KMS_PKI="$state/pki"
  export KMS_IDENTITY="$KMS_PKI/app-1"

  local port
  port="$(free_port)"
  export KMS_ENDPOINT="https://127.0.0.1:$port"
  cat > "$state/kms.toml" <<TOML
listen = "127.0.0.1:$port"

[hsm]
module = "$(softhsm_module)"
token_label = "kms-demo"
pin_file = "$state/user.pin"
# Only recovery ceremonies log in as the token's security officer (to mark the recovery key
# trusted); without it the server refuses recovery init, rekey and restore.
so_pin_file = "$state/so.pin"

[store]
url = "sqlite://$state/kms.db"

[tls]
ca_cert = "$KMS_PKI/ca.pem"
cert = "$KMS_PKI/server.pem"
key = "$KMS_PKI/server.key"

# First start only: the two security officers that make dual approval possible from day one.
[bootstrap]
security_officers = ["spiffe://hospital.test/security-officer/officer-1", "spiffe://hospital.test/security-officer/officer-2"]
TOML

  echo "==> starting kms-server on 127.0.0.1:$port (mutual TLS 1.3)"
  "$BIN/kms-server" --config "$state/kms.toml" > "$state/server.log" 2>&1 &
  SERVER_PID=$!
  trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    if "$BIN/kms-cli" --identity "$KMS_PKI/officer-1" ping > /dev/null 2>&1; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited:"; cat "$state/server.log"; exit 1; fi
    sleep 0.1
  done
  "$BIN/kms-cli" --identity "$KMS_PKI/officer-1" ping > /dev/null
  bind_dev_roles
}

# Runs `kms-cli ARGS` as officer-1 (which must print an approval request as JSON), then
# approves that request as officer-2. Prints the approval id.
propose_and_approve() {
  local id
  id="$("$BIN/kms-cli" --identity "$KMS_PKI/officer-1" --output json "$@" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["approval_id"])')"
  "$BIN/kms-cli" --identity "$KMS_PKI/officer-2" --output json approvals approve "$id" |
    python3 -c 'import json,sys; a = json.load(sys.stdin); assert a["state"] == "executed", a'
  echo "$id"
}

# Binds every development identity but the bootstrap officers to its role, each through a
# proposal by officer-1 approved by officer-2 (bindings change only with approval).
bind_dev_roles() {
  echo "==> binding the development identities to their roles (officer-1 proposes, officer-2 approves)"
  local name kind
  for pair in app-1:app tokenizer-1:tokenizer reidentifier-1:reidentifier custodian-1:custodian \
    custodian-2:custodian auditor-1:auditor breakglass-1:break-glass; do
    name="${pair%%:*}"
    kind="${pair##*:}"
    propose_and_approve roles bind "spiffe://hospital.test/$kind/$name" "$kind" > /dev/null
  done
}

# Makes (once) a Python virtual environment in .venv-python with the Python example's
# requirements (grpcio-tools from PyPI) and exports KMS_PYTHON, its interpreter.
ensure_python_example() {
  local venv="$PWD/.venv-python"
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import grpc_tools' 2> /dev/null; then
    echo "==> Python example environment in $venv (grpcio-tools from PyPI)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r examples/python/requirements.txt
  fi
  export KMS_PYTHON="$venv/bin/python"
}
