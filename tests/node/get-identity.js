#!/usr/bin/env node
// The AWS SDK for JavaScript v3 as a CI job uses it: a credential provider, then STS
// GetCallerIdentity against AWS_ENDPOINT_URL_STS (moto in the tests).
//
// usage: node get-identity.js container|http|imds|chain
//   container: fromContainerMetadata (AWS_CONTAINER_CREDENTIALS_FULL_URI + _TOKEN)
//   http:      fromHttp (FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)
//   imds:      fromInstanceMetadata (IMDSv2 at AWS_EC2_METADATA_SERVICE_ENDPOINT)
//   chain:     the default Node provider chain
// Prints {"Arn","Account","AccessKeyId","mode"} as JSON; on failure prints the SDK's error
// name and message on stderr and exits 1.
"use strict";

const providers = require("@aws-sdk/credential-providers");
const { STSClient, GetCallerIdentityCommand } = require("@aws-sdk/client-sts");

function provider(mode) {
  switch (mode) {
    case "container":
      return providers.fromContainerMetadata({ timeout: 2000, maxRetries: 0 });
    case "http":
      return providers.fromHttp({ timeout: 2000, maxRetries: 0 });
    case "imds":
      return providers.fromInstanceMetadata({ timeout: 2000, maxRetries: 0 });
    case "chain":
      return providers.fromNodeProviderChain();
    default:
      throw new Error(`unknown mode ${JSON.stringify(mode)}: use container, http, imds or chain`);
  }
}

async function main() {
  const mode = process.argv[2] || "chain";
  const credentials = provider(mode);
  const creds = await credentials();
  const sts = new STSClient({
    region: process.env.AWS_REGION || "us-east-1",
    endpoint: process.env.AWS_ENDPOINT_URL_STS,
    credentials,
    maxAttempts: 1,
  });
  const ident = await sts.send(new GetCallerIdentityCommand({}));
  process.stdout.write(
    JSON.stringify({
      Arn: ident.Arn,
      Account: ident.Account,
      AccessKeyId: creds.accessKeyId,
      mode,
    }) + "\n",
  );
}

main().catch((err) => {
  process.stderr.write(`${err.name || "Error"}: ${err.message}\n`);
  process.exit(1);
});
