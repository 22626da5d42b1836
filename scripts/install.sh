#!/usr/bin/env bash
# Installs peerd into ./.venv with everything it needs, system packages included.
#   bash scripts/install.sh          runtime only
#   bash scripts/install.sh --test   plus the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
# Debian packages: the Fashion-MNIST IDX files and `ip` for network-namespace tests.
system_packages=(dataset-fashion-mnist iproute2)
if [[ "${1:-}" == "--test" ]]; then
    extras="[test]"
    # systemd-analyze checks deploy/peerd.service; nft makes a test link lossy; headless
    # Chromium and its WebDriver open the daemon's page in a browser test.
    system_packages+=(systemd nftables chromium chromium-driver)
fi

missing=()
for package in "${system_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "install.sh: please install the Debian packages: ${missing[*]}" >&2
        echo "install.sh: (run as root, or: sudo apt-get install ${missing[*]})" >&2
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# constraints.txt pins the CPU build of torch for every dependency resolution.
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}"
bash scripts/next_steps.sh .venv
