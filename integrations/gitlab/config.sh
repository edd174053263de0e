#!/bin/sh
# gitlab-runner custom executor, config_exec: prints the executor's settings (builds and cache dirs inside the job's sandbox).
# Installed as /usr/share/airlock/integrations/gitlab/config.sh; see docs/gitlab.md.
# Options for `airlock gitlab config` go in config_args in config.toml; gitlab-runner appends
# its own arguments after them.
exec "${AIRLOCK_BIN:-/usr/bin/airlock}" gitlab config "$@"
