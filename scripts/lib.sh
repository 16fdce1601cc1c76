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
