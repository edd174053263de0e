//! Placeholder: replaced by the broker work.
