# Directories, then enable (never start) the service on first install.
systemd-tmpfiles --create batchly-agent.conf || :
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl enable batchly-agent.service >/dev/null 2>&1 || :
fi
