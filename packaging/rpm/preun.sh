# airlock (rpm) %preun. $1: 0 = removal, 1 = upgrade. On removal: stop and disable the agent
# (stopping ends and wipes its sandboxed jobs).
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now airlockd.service >/dev/null 2>&1 || :
    else
        systemctl --no-reload disable airlockd.service >/dev/null 2>&1 || :
    fi
fi
exit 0
