#!/usr/bin/env bash
# airlock demo: a CI job from acme/web's main branch gets short-lived credentials for the
# production deploy role; a job from a feature branch of another repository is refused; the
# audit log shows both and verifies.
#
# Everything runs on 127.0.0.1 and under a temporary directory (nothing under /etc, /var or
# /run is touched): moto_server stands in for AWS STS, `airlock-testkit serve-jwks` for
# GitHub's OIDC keys. Run `make demo` (it installs the test clients and builds first).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$repo/scripts/venv-path.sh")"
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
[[ "$bin" = /* ]] || bin="$repo/$bin"
moto_port=45123 admin_port=45124 jwks_port=45125

# Bold headings on a terminal only: no escapes in a pipe, a file or a log, nor with NO_COLOR.
if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$plain"; }
note() { printf '    %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

for b in airlockd airlock airlock-testkit; do
    [[ -x "$bin/$b" ]] || die "$bin/$b is not built: run 'cargo build --bins' (or 'make demo')"
done
for p in moto_server aws python; do
    [[ -x "$venv/bin/$p" ]] || die "$venv/bin/$p is missing: run scripts/setup-test-deps.sh (or 'make demo')"
done
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $moto_port $admin_port $jwks_port; do
    port_free "$p" || die "port 127.0.0.1:$p is in use: stop what listens there (a previous demo?)"
done

work="$(mktemp -d /tmp/airlock-demo.XXXXXX)"
pids=()
cleanup() {
    local rc=$?
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() { # wait_for WHAT CMD... : retry CMD for up to 30 s
    local what="$1"; shift
    for _ in $(seq 1 300); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not come up; logs are in $work"
}
http_ok() { "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' "$1"; }

step "Starting moto_server (the STS stand-in) on 127.0.0.1:$moto_port"
# moto lets the bootstrap's IAM calls through unsigned, then checks SigV4 signatures and IAM
# permissions on every later request, as AWS would; moto_stand_in.py has it take an unsigned
# AssumeRoleWithWebIdentity as AWS does (the production rule's "readonly" grant).
boot_actions="$(cd "$repo/scripts" && "$venv/bin/python" -c 'import moto_bootstrap; print(moto_bootstrap.BOOTSTRAP_ACTIONS)')"
INITIAL_NO_AUTH_ACTION_COUNT="$boot_actions" "$venv/bin/python" "$repo/scripts/moto_stand_in.py" -H 127.0.0.1 -p "$moto_port" \
    >"$work/moto.log" 2>&1 &
pids+=($!)
wait_for "moto_server" http_ok "http://127.0.0.1:$moto_port/moto-api/"
"$venv/bin/python" "$repo/scripts/moto_bootstrap.py" "http://127.0.0.1:$moto_port" >"$work/agent-user.json"
agent_key_id="$("$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["access_key_id"])' "$work/agent-user.json")"
agent_secret="$("$venv/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["secret_access_key"])' "$work/agent-user.json")"
note "IAM user airlock-agent ($agent_key_id) may assume the roles web-prod-deploy, web-staging-deploy, ..."

step "Serving the test OIDC keys (as GitHub would) on 127.0.0.1:$jwks_port"
"$bin/airlock-testkit" serve-jwks --dir "$repo/tests/fixtures/oidc" --port "$jwks_port" \
    >"$work/jwks.log" 2>&1 &
pids+=($!)
wait_for "the JWKS server" http_ok "http://127.0.0.1:$jwks_port/jwks.json"

step "Starting airlockd with config/demo.toml (everything under $work)"
cp "$repo/config/demo.toml" "$work/demo.toml"
mkdir -p "$work/policies"
# The repository's policies (files only: policies/cookbook/ holds examples, not these).
find "$repo/policies" -maxdepth 1 -type f -exec cp {} "$work/policies/" \;
cd "$work"
# The agent's own AWS keys live in airlockd's environment only; jobs never see them.
env -u AWS_SESSION_TOKEN -u AWS_PROFILE \
    AWS_ACCESS_KEY_ID="$agent_key_id" AWS_SECRET_ACCESS_KEY="$agent_secret" \
    "$bin/airlockd" --config demo.toml 2>"$work/airlockd.log" &
agent_pid=$!
pids+=($agent_pid)
# Kept (0600, in the demo's private directory) only until the sandboxed agent of job 3 starts.
(umask 077; printf '%s' "$agent_secret" >agent-secret)
unset agent_secret
wait_for "airlockd" http_ok "http://127.0.0.1:$admin_port/healthz"
note "policies loaded: $(ls policies/*.toml | xargs -n1 basename | tr '\n' ' ')"

airlock() { "$bin/airlock" --config demo.toml "$@"; }
mint() { # mint CLAIMS_JSON > token
    printf '%s' "$1" >claims.json
    "$bin/airlock-testkit" mint --key "$repo/tests/fixtures/oidc/rsa.pem" --kid test-rsa-1 --alg RS256 \
        --issuer https://token.actions.githubusercontent.com --audience airlock-test --claims claims.json
}

step "Job 1: acme/web, push to main, environment production"
mint '{"sub":"repo:acme/web:environment:production","repository":"acme/web","repository_owner":"acme",
  "repository_id":"700001","repository_owner_id":"500001","ref":"refs/heads/main","ref_type":"branch","environment":"production","event_name":"push",
  "workflow_ref":"acme/web/.github/workflows/deploy.yml@refs/heads/main","actor":"octocat",
  "run_id":"4242","run_attempt":"1","runner_environment":"self-hosted"}' >prod.jwt
note "\$ airlock run --oidc-token-file prod.jwt -- aws sts get-caller-identity"
PATH="$venv/bin:$PATH" airlock run --oidc-token-file prod.jwt -- \
    aws sts get-caller-identity --endpoint-url "http://127.0.0.1:$moto_port" --output json | tee job1.json
grep -q 'assumed-role/web-prod-deploy/' job1.json \
    || die "job 1 did not get the production deploy role (see $work/airlockd.log)"
note "The job's AWS CLI found credentials through the container-credentials endpoint that"
note "airlock opened for this job alone: role web-prod-deploy, session named after the job."

step "Job 2: other-org/tool, push to feature/login (no policy rule matches)"
mint '{"sub":"repo:other-org/tool:ref:refs/heads/feature/login","repository":"other-org/tool",
  "repository_owner":"other-org","ref":"refs/heads/feature/login","ref_type":"branch",
  "event_name":"push","workflow_ref":"other-org/tool/.github/workflows/ci.yml@refs/heads/feature/login",
  "actor":"dev1","run_id":"4343","run_attempt":"1","runner_environment":"self-hosted"}' >feature.jwt
note "\$ airlock job start --oidc-token-file feature.jwt"
set +e
airlock job start --oidc-token-file feature.jwt >job2.json 2>job2.err
job2_rc=$?
set -e
# Show the decision, not the job's endpoint token.
"$venv/bin/python" -c '
import json, sys
try:
    j = json.load(open("job2.json"))
except Exception:
    sys.exit(0)
for k in ("job_id", "identity", "rule", "grants", "refused"):
    v = j.get(k)
    # Only what the job has: a refused job has no rule and no grants.
    if v is None or v == [] or v == {}:
        continue
    if isinstance(v, list):
        v = ", ".join(g.get("alias", str(g)) if isinstance(g, dict) else str(g) for g in v)
    print("    %-9s %s" % (k + ":", v))'
cat job2.err
refusal="$("$venv/bin/python" -c '
import json, sys
try:
    print(json.load(open("job2.json")).get("refused") or "")
except Exception:
    print("")')"
if [[ -n "$refusal" ]]; then
    note "The agent refused the job: its endpoint will serve it no credentials."
elif [[ $job2_rc -ne 0 ]]; then
    note "Refused (exit $job2_rc): $(cat job2.err)"
else
    die "job 2 was not refused"
fi
job2_id="$("$venv/bin/python" -c 'import json; print(json.load(open("job2.json")).get("job_id",""))' 2>/dev/null || true)"
if [[ -n "$job2_id" ]]; then
    note "\$ airlock run --oidc-token-file feature.jwt -- aws sts get-caller-identity"
    set +e
    PATH="$venv/bin:$PATH" AWS_MAX_ATTEMPTS=1 AWS_METADATA_SERVICE_NUM_ATTEMPTS=1 \
        airlock run --oidc-token-file feature.jwt -- \
        aws sts get-caller-identity --endpoint-url "http://127.0.0.1:$moto_port" --output json \
        >job2-sdk.out 2>job2-sdk.err
    sdk_rc=$?
    set -e
    # The refusal is the expected outcome here: show what the job's endpoint told its SDK,
    # not the SDK's error report.
    [[ $sdk_rc -ne 0 ]] || die "job 2's SDK got credentials: $(cat job2-sdk.out)"
    endpoint_said="$(grep -o '"Code":"[^"]*","Message":"[^"]*"' job2-sdk.err | head -1 |
        sed 's/"Code":"\([^"]*\)","Message":"\([^"]*\)"/\1: \2/')"
    [[ -n "$endpoint_said" ]] || die "job 2's SDK failed for another reason: $(cat job2-sdk.err)"
    note "(exit $sdk_rc: the job's SDK gets no credentials at all; its endpoint answered"
    note " $endpoint_said)"
    airlock job end "$job2_id" >/dev/null 2>&1 || true
fi

step "Job 3: the production job again, now in a sandbox of its own"
note "Restarting airlockd with [sandbox] enabled = true (its own namespaces, cgroup, user and"
note "network namespace per job; the job's endpoint lives inside that namespace)."
kill -TERM "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
sed 's/^enabled = false$/enabled = true/' demo.toml >demo-sandbox.toml
grep -q '^enabled = true$' demo-sandbox.toml || die "config/demo.toml has no [sandbox] enabled line"
agent_secret="$(cat agent-secret)"
rm -f agent-secret
env -u AWS_SESSION_TOKEN -u AWS_PROFILE \
    AWS_ACCESS_KEY_ID="$agent_key_id" AWS_SECRET_ACCESS_KEY="$agent_secret" \
    "$bin/airlockd" --config demo-sandbox.toml 2>>"$work/airlockd.log" &
agent_pid=$!
pids+=($agent_pid)
unset agent_secret
wait_for "airlockd (sandboxed)" http_ok "http://127.0.0.1:$admin_port/healthz"
note "\$ airlock run --oidc-token-file prod.jwt -- sh -c '...what the job sees...'"
"$bin/airlock" --config demo-sandbox.toml run --oidc-token-file prod.jwt -- /bin/sh -c "
echo \"    user: uid \$(id -u), capabilities \$(grep CapEff /proc/self/status | cut -f2), processes visible: \$(ls /proc | grep -c '^[0-9]')\"
echo \"    endpoint: \$AWS_CONTAINER_CREDENTIALS_FULL_URI (inside the job's own network namespace)\"
$venv/bin/python -c 'import boto3; c = boto3.Session().get_credentials(); print(\"    the SDK found access key\", c.get_frozen_credentials().access_key, \"via\", c.method)'
if curl -s -m 2 -o /dev/null http://127.0.0.1:$moto_port/; then echo '    reached the host!'; else echo '    the host (STS stand-in at 127.0.0.1:$moto_port) is out of reach: endpoint-only network'; fi
" | tee job3.txt
grep -q "access key ASIA" job3.txt || die "job 3 did not find its credentials in the sandbox (see $work/airlockd.log)"
note "The key is the one the audit shows issued to that job; when it ended the agent killed"
note "its cgroup, removed its network namespace and directories, and checked nothing was left:"
"$bin/airlock" --config demo-sandbox.toml audit query --event job_wiped | "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print("    job_wiped %s: killed %s process(es), leftovers %s, %s ms" % (r["job"], r["processes_killed"], r["leftovers"], r["millis"]))'
note "(A sandboxed job never reaches the host itself, where this demo's STS stand-in listens;"
note " on a runner, STS is on the internet, reached through the rule's [rule.egress] allowlist.)"

step "The audit trail"
# One line per record here; `airlock audit query` itself prints full JSON lines.
summarise() {
    "$venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    what = r.get("refused") or r.get("assumed_role_arn") or r.get("rule") or r.get("reason") or r.get("message") or ""
    print("    #%-3s %-19s %-20s %s" % (r.get("seq"), r.get("event"), r.get("job"), what))'
}
note "\$ airlock audit query --repository acme/web   (summarised)"
airlock audit query --repository acme/web | summarise
# Every grant of the demo's jobs was issued: an STS error here is the demo failing.
sts_errors="$(airlock audit query --event sts_error)"
[[ -z "$sts_errors" ]] || die "STS refused or failed a call (see $work/moto.log):
$sts_errors"
note "\$ airlock audit query --repository other-org/tool   (summarised)"
airlock audit query --repository other-org/tool | summarise
note "\$ airlock audit verify"
airlock audit verify

step "What happened"
note "1. airlockd verified each job's GitHub OIDC token against the issuer's keys."
note "2. The production job matched rule web-production and got 1-hour STS credentials for"
note "   web-prod-deploy, served only to that job's processes; they were dropped when it ended."
note "3. The feature-branch job matched no rule: it got no credentials, and the refusal is audited."
note "4. In a sandbox the same job ran as an unprivileged slot user with no capabilities, saw"
note "   only its own processes and reached only its own endpoint; it was wiped when it ended."
note "5. Every record is hash-chained: 'audit verify' would name the first edited line."
note "Cleaning up (moto, JWKS server, airlockd, $work)."
