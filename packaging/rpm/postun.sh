# airlock (rpm) %postun. $1: 0 = removal, 1 = upgrade (the new %post restarted the agent).
# Job records and the audit log stay (the log is evidence); the host's nftables table is the
# admin's to delete: nft delete table inet airlock.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    echo "airlock: removed; delete the host's firewall table with: nft delete table inet airlock"
fi
exit 0
