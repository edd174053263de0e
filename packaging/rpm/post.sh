# airlock (rpm) %post. $1: 1 = first install, 2 = upgrade. /etc/airlock/airlock.toml is
# %config(noreplace): rpm keeps an edited one (the new default lands in .rpmnew). The
# package ships no file in /etc/airlock/policies (examples: /usr/share/doc/airlock/examples).
systemd_running() {
    [ -d /run/systemd/system ] || return 1
    if command -v systemd-detect-virt >/dev/null 2>&1 && systemd-detect-virt --quiet --chroot; then
        return 1
    fi
    return 0
}
install -d -m 0755 /etc/airlock
[ -d /etc/airlock/policies ] || install -d -m 0755 /etc/airlock/policies
install -d -m 0700 /var/lib/airlock
install -d -m 0700 /var/log/airlock
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
    # Works without a running systemd: it only writes the wants symlink.
    systemctl --no-reload enable airlockd.service >/dev/null 2>&1 || :
fi
if systemd_running; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 2 ]; then
        # airlockd and airlock-shim must be the same version: restart a running agent. %pre
        # drained it (no job left, none taken since); jobs still running after the drain's
        # timeout are ended and wiped here (docs/packaging.md, "Upgrading").
        systemctl try-restart airlockd.service >/dev/null 2>&1 || :
    else
        echo "airlock: review /etc/airlock/airlock.toml, write policies in /etc/airlock/policies" \
            "(examples: /usr/share/doc/airlock/examples/policies), then: systemctl start airlockd"
    fi
fi
exit 0
