# airlock (rpm) %pre. $1: 1 = first install, 2 = upgrade. On upgrade, drain a running agent
# first (below): rpm runs the new %post (which restarts the agent) before the old %preun,
# so this is the one scriptlet that runs before the new files replace the old ones. The
# old binaries are still in place: an airlock older than `drain` fails it, and the upgrade
# goes on as before (the restart ends and wipes running jobs).
systemd_running() {
    [ -d /run/systemd/system ] || return 1
    if command -v systemd-detect-virt >/dev/null 2>&1 && systemd-detect-virt --quiet --chroot; then
        return 1
    fi
    return 0
}

# Drain the running agent before the new files replace the old ones: it takes no new job,
# and the running ones finish with the binaries they started with (docs/packaging.md,
# "Upgrading"). The restart after the upgrade then ends nothing, and takes jobs again.
# AIRLOCK_DRAIN_TIMEOUT (the environment, else /etc/default/airlock or
# /etc/sysconfig/airlock): how long to wait, a number with s, m, h or d; default 30m; 0:
# do not drain. Jobs still running after it are ended and wiped by that restart, as
# without a drain. Never fails the upgrade; `airlock drain` bounds each of its requests,
# so it never waits much past the timeout.
drain_for_upgrade() {
    timeout=${AIRLOCK_DRAIN_TIMEOUT:-}
    if [ -z "$timeout" ]; then
        for f in /etc/default/airlock /etc/sysconfig/airlock; do
            [ -r "$f" ] || continue
            v=$(sed -n 's/^[[:space:]]*AIRLOCK_DRAIN_TIMEOUT=["'\'']\{0,1\}\([0-9A-Za-z]*\).*/\1/p' "$f" | tail -n 1)
            [ -z "$v" ] || timeout=$v
        done
    fi
    timeout=${timeout:-30m}
    if [ "$timeout" = 0 ]; then
        echo "airlock: AIRLOCK_DRAIN_TIMEOUT=0: not draining; the restart after the upgrade ends and wipes running jobs"
        return 0
    fi
    if ! printf '%s\n' "$timeout" | grep -Eqx '[0-9]+[smhd]'; then
        echo "airlock: AIRLOCK_DRAIN_TIMEOUT=$timeout is not a number with s, m, h or d; using 30m" >&2
        timeout=30m
    fi
    echo "airlock: draining airlockd before the upgrade: no new job starts; waiting up to $timeout for the running ones (AIRLOCK_DRAIN_TIMEOUT)"
    rc=0
    /usr/bin/airlock drain --timeout "$timeout" || rc=$?
    case $rc in
    0) echo "airlock: drained; airlockd restarts with the new version" ;;
    75) echo "airlock: jobs still ran after $timeout: the restart after the upgrade ends and wipes them" ;;
    *) echo "airlock: airlockd could not be drained (exit $rc): the restart after the upgrade ends and wipes its running jobs" ;;
    esac
    return 0
}

if [ "$1" -ge 2 ] && systemd_running && [ -x /usr/bin/airlock ] \
    && systemctl is-active --quiet airlockd.service; then
    drain_for_upgrade
fi
exit 0
