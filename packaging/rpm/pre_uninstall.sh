# On removal (not upgrade): stop (the agent drains) and disable.
if [ "$1" -eq 0 ]; then
    systemctl disable --now batchly-agent.service >/dev/null 2>&1 || :
fi
