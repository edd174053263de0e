#!/bin/sh
# gitlab-runner custom executor, prepare_exec: starts the airlock job and its sandbox with the identity of the job's id token (read from $JOB_RESPONSE_FILE).
# Installed as /usr/share/airlock/integrations/gitlab/prepare.sh; see docs/gitlab.md.
# Options for `airlock gitlab prepare` go in prepare_args in config.toml; gitlab-runner appends
# its own arguments after them. The binary's path is fixed here, never taken from a variable.
exec /usr/bin/airlock gitlab prepare "$@"
