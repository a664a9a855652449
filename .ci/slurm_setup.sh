#!/usr/bin/env bash
# Install a single-node SLURM (Debian's slurmctld, slurmd, slurm-client, munge) for the
# SLURM tests (tests/test_slurm.py). Idempotent: does nothing when the binaries are present.
# Needs root (or sudo) and the Debian package mirror; the tests skip with a reason otherwise.
#   bash .ci/slurm_setup.sh
set -euo pipefail

need=()
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "slurm_setup: slurmctld, slurmd, sbatch and munged already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "slurm_setup: not root and no sudo; cannot install ${need[*]}" >&2; exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps the packages' postinst from starting daemons: the test
# fixture starts its own munged/slurmctld/slurmd with a private config and stops them by PID.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    made_policy=1
fi
cleanup() { if [ "$made_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

if ! apt-cache policy slurmctld 2>/dev/null | grep -q Candidate:.*[0-9]; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge
echo "slurm_setup: installed slurm $(dpkg-query -W -f '${Version}' slurmctld)"
