#!/bin/sh
# gitlab-runner custom executor, cleanup_exec: ends the airlock job; its sandbox is wiped.
# Installed as /usr/share/airlock/integrations/gitlab/cleanup.sh; see docs/gitlab.md.
# Options for `airlock gitlab cleanup` go in cleanup_args in config.toml; gitlab-runner appends
# its own arguments after them. The binary's path is fixed here, never taken from a variable.
exec /usr/bin/airlock gitlab cleanup "$@"
