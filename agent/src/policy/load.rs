//! Placeholder: replaced by the policy work.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("placeholder")]
    Placeholder,
}
pub fn load_dir(_dir: &std::path::Path) -> Result<(), PolicyError> {
    Err(PolicyError::Placeholder)
}
