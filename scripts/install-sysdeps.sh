#!/usr/bin/env bash
# Install the Debian packages the test suite needs. Idempotent; skips apt when all are present.
set -euo pipefail
PKGS=(openssh-server openssh-client iproute2 procps e2fsprogs nftables chromium sudo systemd)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-sysdeps: missing packages ${missing[*]} and not root; install them with apt-get" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Single-node Slurm for the slurm-marked tests (apt packages only; idempotent, quiet).
# The tests start the daemons themselves (scripts/slurm.sh start) when squeue does not answer.
# (with slurmdbd and MariaDB for the accounting test, which runs its cluster in a namespace without network)
SLURM_ACCOUNTING=1 bash "$(dirname "$0")/slurm.sh" install
# Son of Grid Engine (gridengine-master/-exec/-client) for the sge-marked tests, debconf answers
# preseeded; the tests start the cell themselves (scripts/sge.sh start) when qstat does not answer.
bash "$(dirname "$0")/sge.sh" install
