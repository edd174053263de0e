#!/usr/bin/env python3
"""Bootstrap a moto_server as an STS/IAM stand-in for airlock's tests and demo.

Creates the IAM user the agent signs AssumeRole with ("airlock-agent", allowed
sts:AssumeRole, sts:TagSession and sts:SetSourceIdentity on the account's roles) and the
roles the example policies grant. Prints {"access_key_id": ..., "secret_access_key": ...,
"account_id": ..., "roles": [...]} as JSON on stdout.

Usage: moto_bootstrap.py http://127.0.0.1:PORT

The number of IAM calls made here is fixed: the harness starts moto_server with
INITIAL_NO_AUTH_ACTION_COUNT equal to BOOTSTRAP_ACTIONS, so that every later request must
be signed by a known key and allowed by IAM. Change BOOTSTRAP_ACTIONS with the calls.
"""

import json
import sys

import boto3

ACCOUNT_ID = "123456789012"
USER = "airlock-agent"
ROLES = ["web-prod-deploy", "web-prod-readonly", "web-staging-deploy", "ci-readonly"]
# create_user + put_user_policy + create_access_key + (create_role + put_role_policy) per role
BOOTSTRAP_ACTIONS = 3 + 2 * len(ROLES)

AGENT_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
            "Resource": f"arn:aws:iam::{ACCOUNT_ID}:role/*",
        }
    ],
}

TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT_ID}:user/{USER}"},
            "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
        },
        {
            "Effect": "Allow",
            "Principal": {
                "Federated": f"arn:aws:iam::{ACCOUNT_ID}:oidc-provider/token.actions.githubusercontent.com"
            },
            "Action": ["sts:AssumeRoleWithWebIdentity", "sts:TagSession"],
        },
    ],
}

ROLE_PERMISSIONS = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["sts:GetCallerIdentity", "s3:ListAllMyBuckets"],
            "Resource": "*",
        }
    ],
}


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: moto_bootstrap.py http://127.0.0.1:PORT", file=sys.stderr)
        return 2
    endpoint = sys.argv[1]
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        # moto accepts anything before INITIAL_NO_AUTH_ACTION_COUNT is reached.
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName=USER)
    iam.put_user_policy(
        UserName=USER,
        PolicyName="airlock-agent-assume",
        PolicyDocument=json.dumps(AGENT_POLICY),
    )
    key = iam.create_access_key(UserName=USER)["AccessKey"]
    for role in ROLES:
        iam.create_role(
            RoleName=role,
            AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
            MaxSessionDuration=43200,
        )
        iam.put_role_policy(
            RoleName=role,
            PolicyName=f"{role}-permissions",
            PolicyDocument=json.dumps(ROLE_PERMISSIONS),
        )
    json.dump(
        {
            "access_key_id": key["AccessKeyId"],
            "secret_access_key": key["SecretAccessKey"],
            "account_id": ACCOUNT_ID,
            "roles": [f"arn:aws:iam::{ACCOUNT_ID}:role/{r}" for r in ROLES],
            "bootstrap_actions": BOOTSTRAP_ACTIONS,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
