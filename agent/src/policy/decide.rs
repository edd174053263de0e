//! Placeholder: replaced by the policy work.
#[derive(Debug)]
pub struct Decision;
#[derive(Debug)]
pub struct Explanation;
#[derive(Debug)]
pub struct RuleVerdict;
