#!/bin/sh
# gitlab-runner custom executor, config_exec: prints the executor's settings (builds and cache dirs inside the job's sandbox).
# Installed as /usr/share/airlock/integrations/gitlab/config.sh; see docs/gitlab.md.
# Options for `airlock gitlab config` go in config_args in config.toml; gitlab-runner appends
# its own arguments after them. The binary's path is fixed here, never taken from a variable.
exec /usr/bin/airlock gitlab config "$@"
