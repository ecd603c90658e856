#!/usr/bin/env bash
# Installs batchly-agent from its .rpm on Amazon Linux 2023, with what the
# sandbox uses from the host, and the keys file if the build was given one.
set -euo pipefail

rpm=${BATCHLY_RPM:?BATCHLY_RPM must name the uploaded .rpm}

# Security fixes published for this release of AL2023 before the AMI is cut.
dnf -y upgrade --security
# nftables is the second layer keeping egress jobs from instance metadata.
dnf -y install nftables "$rpm"
rm -f "$rpm"

test -x /usr/bin/batchly-agent
test -f /usr/lib/systemd/system/batchly-agent.service
test -f /etc/batchly/agent.toml
batchly-agent --version

# The keys location: the directory belongs to root and nobody else may
# write there. The file itself usually comes from user data at boot.
install -d -o root -g root -m 0755 /etc/batchly
if [ -n "${BATCHLY_VERIFICATION_KEYS_B64:-}" ]; then
    umask 077
    base64 -d <<<"$BATCHLY_VERIFICATION_KEYS_B64" >/etc/batchly/keys.toml
    chown root:root /etc/batchly/keys.toml
    chmod 0600 /etc/batchly/keys.toml
    echo "baked in /etc/batchly/keys.toml ($(grep -c '^\[\[key\]\]' /etc/batchly/keys.toml) key(s))"
fi
