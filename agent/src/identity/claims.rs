//! Placeholder: replaced by the identity work.
use super::JobIdentity;
use serde_json::{Map, Value};

pub fn normalise(
    _provider: super::Provider,
    _issuer: &str,
    _source: super::IdentitySource,
    _claims: Map<String, Value>,
) -> JobIdentity {
    unreachable!("identity::claims is being written")
}

pub fn from_attested(_claims: Map<String, Value>) -> Result<JobIdentity, super::IdentityError> {
    unreachable!("identity::claims is being written")
}
