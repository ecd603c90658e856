# rpm has no purge, so erase keeps /var/lib/batchly like a .deb remove: the
# spool's unshipped output and the crash ledger survive a reinstall. Delete
# it by hand once nothing is left to ship. A changed agent.toml is kept as
# agent.toml.rpmsave.
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 0 ]; then
    rm -rf /run/batchly
fi
