#!/usr/bin/env bash
# Enables the agent so it starts at every boot; it is not started here, so
# the AMI holds no state, spool or ledger from the build.
set -euo pipefail

systemctl enable batchly-agent.service
test "$(systemctl is-enabled batchly-agent.service)" = enabled
if systemctl is-active --quiet batchly-agent.service; then
    echo "batchly-agent is running on the build instance; an AMI must not carry its state" >&2
    exit 1
fi
# The example config must pass the agent's own check, except for what
# only the launched instance has: the keys file (from user data) and
# queue.url (from the stack).
if [ -f /etc/batchly/keys.toml ]; then
    batchly-agent check-config --config /etc/batchly/agent.toml >/dev/null
fi
