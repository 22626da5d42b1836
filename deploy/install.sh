#!/usr/bin/env bash
# Installs peerd as a systemd service on a Debian-based board (Debian 12, Raspberry Pi OS,
# Ubuntu 24.04): the Debian packages it needs, peerd in /opt/peerd/venv, the unit in
# /etc/systemd/system and, if missing, /etc/peerd/peerd.env. Safe to re-run: it upgrades peerd
# to this checkout and keeps your configuration. Run as root from a checkout:
#   sudo bash deploy/install.sh
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/opt/peerd
venv="$prefix/venv"
unit=/etc/systemd/system/peerd.service
env_file=/etc/peerd/peerd.env
tls_dir=/etc/peerd/tls
# The service runs as an unprivileged dynamic user: everything installed must be world-readable.
umask 022

say() { echo "install.sh: $*"; }
die() { echo "install.sh: error: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root (sudo bash $0)"
command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian-based systems"
case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) die "PyTorch has no wheels for $(uname -m); use a 64-bit OS (x86_64 or aarch64)" ;;
esac

# python3-venv for the venv (and its pip); dataset-fashion-mnist for the fmnist task.
system_packages=(python3 python3-venv ca-certificates dataset-fashion-mnist)
missing=()
for package in "${system_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "peerd needs Python 3.11 or newer; this system has $(python3 --version)"

if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv"
    python3 -m venv "$venv"
fi
pip_args=(--quiet --disable-pip-version-check -c "$repo/constraints.txt")
if [[ "$(uname -m)" == x86_64 ]]; then
    # On x86_64 PyPI's torch is the CUDA build (several GB); the CPU build is a local version
    # (2.13.0+cpu) that satisfies the pin in constraints.txt and is preferred over it.
    pip_args+=(--extra-index-url "${PEERD_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}")
fi
say "installing peerd from $repo into $venv (this takes a while the first time)"
# Not editable: the service cannot read a checkout under /home, and must not change with it.
"$venv/bin/pip" install "${pip_args[@]}" "$repo"
"$venv/bin/peerd" --help >/dev/null

install -D -m 0644 "$repo/deploy/peerd.service" "$unit"
# The device's key goes here: root only. The unit hands the files to the service (credentials).
install -d -m 0700 "$tls_dir"
if [[ -e "$env_file" ]]; then
    say "kept your $env_file (the example is $repo/deploy/peerd.env)"
else
    install -D -m 0644 "$repo/deploy/peerd.env" "$env_file"
    say "wrote $env_file: edit it to configure this board"
fi

if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    if systemctl is-active --quiet peerd; then
        say "peerd is running the previous version: systemctl restart peerd"
    fi
else
    say "systemd is not running here (a chroot or container?): run systemctl daemon-reload later"
fi

missing_tls=()
for file in ca.crt device.crt device.key; do
    [[ -f "$tls_dir/$file" ]] || missing_tls+=("$file")
done
if ((${#missing_tls[@]})); then
    say "missing in $tls_dir: ${missing_tls[*]}; on the machine that holds the cluster CA run"
    say "  peerd ca issue NAME   (NAME: this board's peer id; docs/SECURITY.md)"
    say "and copy the three files it writes into $tls_dir (the key with mode 0600)"
fi

cat <<EOF
install.sh: done. Next:
  ls $tls_dir                 # ca.crt, device.crt, device.key of this board
  editor $env_file            # cluster, shard, peers, ... (docs/SYSTEMD.md)
  systemctl enable --now peerd       # start now and at every boot
  systemctl status peerd             # state, and the daemon's STATUS line
  journalctl -u peerd -f             # its log
EOF
