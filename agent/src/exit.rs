//! sysexits(3) exit codes used by `airlockd` and `airlock`.

pub const OK: i32 = 0;
/// A test-like command ran and an expectation was not met (`airlock policy explain
/// --expect`, `airlock policy test`): as `test(1)` and `diff(1)`, not a sysexits code.
pub const EXPECTATION_FAILED: i32 = 1;
/// Command line usage error.
pub const USAGE: i32 = 64;
/// Input data was incorrect (bad policy, bad token, tampered audit log).
pub const DATAERR: i32 = 65;
/// An input file did not exist or was not readable.
pub const NOINPUT: i32 = 66;
/// A service is unavailable (agent not running, STS unreachable).
pub const UNAVAILABLE: i32 = 69;
/// Internal software error.
pub const SOFTWARE: i32 = 70;
/// An operating system error (cannot bind, cannot create a directory).
pub const OSERR: i32 = 71;
/// Cannot create an output file (the audit log).
pub const CANTCREAT: i32 = 73;
/// Input/output error.
pub const IOERR: i32 = 74;
/// Temporary failure; the user may retry.
pub const TEMPFAIL: i32 = 75;
/// Permission denied (not root, refused by policy).
pub const NOPERM: i32 = 77;
/// Configuration error.
pub const CONFIG: i32 = 78;
