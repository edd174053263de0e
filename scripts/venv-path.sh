#!/usr/bin/env bash
# Prints where the test clients' Python venv lives: $AIRLOCK_VENV, or for root
# /var/cache/airlock/test-venv (outside /root, which sandboxed jobs cannot see), or
# ~/.cache/airlock/venv. tests/src/paths.rs follows the same rule.
if [[ -n "${AIRLOCK_VENV:-}" ]]; then
    echo "$AIRLOCK_VENV"
elif [[ $(id -u) -eq 0 ]]; then
    echo /var/cache/airlock/test-venv
else
    echo "$HOME/.cache/airlock/venv"
fi
