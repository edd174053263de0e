//! Placeholder: replaced by the identity work.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("placeholder")]
    Placeholder,
}
#[derive(Debug)]
pub struct Verifier;
