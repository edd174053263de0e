#!/bin/sh
# gitlab-runner custom executor, run_exec <script> <stage>: runs the stage's script inside the job's sandbox.
# Installed as /usr/share/airlock/integrations/gitlab/run.sh; see docs/gitlab.md.
# Options for `airlock gitlab run` go in run_args in config.toml; gitlab-runner appends
# its own arguments after them. The binary's path is fixed here, never taken from a variable.
exec /usr/bin/airlock gitlab run "$@"
