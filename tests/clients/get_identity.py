#!/usr/bin/env python3
"""boto3 as a CI job uses it: the default credential chain, then STS GetCallerIdentity.

Prints {"Arn", "Account", "AccessKeyId", "method"} as JSON; "method" is botocore's name for
the provider that answered ("container-role" for the container-credentials endpoint,
"iam-role" for instance metadata), so a test can tell which path was taken.
The STS endpoint comes from AWS_ENDPOINT_URL_STS (moto in the tests). Exit 1 with the
SDK's error on stderr when no credentials can be had.
"""

import json
import sys

import boto3
import botocore.exceptions


def main() -> int:
    session = boto3.Session()
    try:
        creds = session.get_credentials()
        if creds is None:
            print("no credentials found by the default chain", file=sys.stderr)
            return 1
        frozen = creds.get_frozen_credentials()
        ident = session.client("sts").get_caller_identity()
    except botocore.exceptions.BotoCoreError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except botocore.exceptions.ClientError as e:
        print(f"ClientError: {e}", file=sys.stderr)
        return 1
    json.dump(
        {
            "Arn": ident["Arn"],
            "Account": ident["Account"],
            "AccessKeyId": frozen.access_key,
            "method": creds.method,
        },
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
