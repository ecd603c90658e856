# RPM has no purge: removal drops the state; a changed agent.toml is kept as .rpmsave.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/batchly /run/batchly
fi
