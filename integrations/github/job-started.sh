#!/bin/sh
# airlock: the name the runner accepts for the job-started hook (it runs `bash -e <file>.sh`):
# ACTIONS_RUNNER_HOOK_JOB_STARTED=/usr/share/airlock/integrations/github/job-started.sh
exec /usr/bin/airlock github job-started
