#!/usr/bin/env python3
"""moto_server as the demo's STS stand-in, answering AssumeRoleWithWebIdentity as AWS does.

Usage: moto_stand_in.py [moto_server's arguments]   (e.g. -H 127.0.0.1 -p 45123)

With INITIAL_NO_AUTH_ACTION_COUNT set, moto checks the SigV4 signature and IAM permissions
of every request after the bootstrap, as AWS does. AWS takes one STS call unsigned,
though: AssumeRoleWithWebIdentity, which is authenticated by the web identity token it
carries (the role's trust policy checks the token). moto 5.2.1 looks for an Authorization
header on it all the same and, finding none, answers HTTP 500. This runs moto_server with
that one call, when it comes unsigned, let through its signature check; every other
request is checked as before, and a signed AssumeRoleWithWebIdentity too.

The tests' harness (tests/src/moto.rs) starts a moto without authentication for the tests
of that call instead; the demo runs the repository's example policies, whose production
rule has a web-identity grant, against one enforcing moto.
"""

import sys

from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import main

# What AWS accepts without a signature (docs: "Calling AssumeRoleWithWebIdentity does not
# require the use of AWS security credentials").
UNSIGNED_ACTIONS = frozenset({"AssumeRoleWithWebIdentity"})

_check = getattr(ActionAuthenticatorMixin, "_authenticate_and_authorize_action", None)
if _check is None:
    sys.exit(
        "moto_stand_in: this moto has no ActionAuthenticatorMixin._authenticate_and_authorize_action; "
        "scripts/setup-test-deps.sh installs the pinned moto"
    )


def _authenticate_and_authorize_action(self, iam_request_cls, resource="*"):
    if self._get_action() in UNSIGNED_ACTIONS and "Authorization" not in self.headers:
        return None
    return _check(self, iam_request_cls, resource)


ActionAuthenticatorMixin._authenticate_and_authorize_action = _authenticate_and_authorize_action

if __name__ == "__main__":
    sys.exit(main())
