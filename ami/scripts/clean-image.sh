#!/usr/bin/env bash
# Leaves nothing from the build instance that every launched instance
# would otherwise share: cloud-init's record of having run, the machine id,
# host keys and logs. The agent never ran here (enable-agent.sh checks).
set -euo pipefail

# cloud-init runs again on first boot, so the stack's user data applies.
cloud-init clean --logs
# Empty, not removed: systemd makes a new one at first boot.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*
dnf clean all
journalctl --rotate
journalctl --vacuum-time=1s
