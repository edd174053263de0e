//! The job registry: which jobs exist, and their records on disk for crash recovery.
//!
//! A record holds what the agent needs to serve a job again after a restart: its identity
//! (never a token), the SHA-256 of its endpoint token, its listener address and its
//! deadline. Records are written atomically (temporary file, fsync, rename, fsync of the
//! directory) in a root-only directory.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

use crate::identity::JobIdentity;

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("cannot create state directory {0}: {1}")]
    CreateDir(PathBuf, std::io::Error),
    #[error("cannot write job record {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot read job records in {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot remove job record {0}: {1}")]
    Remove(PathBuf, std::io::Error),
}

/// One job as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRecord {
    pub id: String,
    pub runner: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// `None` until the job binds its identity.
    pub identity: Option<JobIdentity>,
    /// Hex SHA-256 of the endpoint token; the token itself is never stored.
    pub token_sha256: String,
    /// The job's listener (`ip:port`).
    pub endpoint: std::net::SocketAddr,
    /// Owner of the token file (the control client that started the job).
    pub token_uid: u32,
    pub rule: Option<String>,
    pub aliases: Vec<String>,
    pub refused: Option<String>,
    pub flags: Vec<String>,
    /// The user slot of a sandboxed job (`None`: not sandboxed).
    #[serde(default)]
    pub sandbox_slot: Option<u32>,
    /// The process the job belongs to (see `StartRequest::owner_pid`): the job ends when it
    /// exits, and callers that are not root act on the job only from it or below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<crate::procs::ProcId>,
}

/// Job ids: `j-` and 16 hex digits from the OS's random source.
pub fn new_job_id() -> String {
    let mut b = [0u8; 8];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut b);
    format!("j-{}", hex::encode(b))
}

/// A job id is only ever of that form; anything else from a client is refused before it
/// touches a path.
pub fn valid_job_id(id: &str) -> bool {
    id.len() == 18 && id.starts_with("j-") && id[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Job records in `<state_dir>/jobs/<id>.json`.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store, JobsError> {
        let dir = state_dir.join("jobs");
        for d in [state_dir, dir.as_path()] {
            fs::create_dir_all(d).map_err(|e| JobsError::CreateDir(d.into(), e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))
                .map_err(|e| JobsError::CreateDir(d.into(), e))?;
        }
        Ok(Store { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn save(&self, rec: &JobRecord) -> Result<(), JobsError> {
        let path = self.path(&rec.id);
        let tmp = self.dir.join(format!(".{}.tmp", rec.id));
        let data = serde_json::to_vec_pretty(rec).expect("a job record always serialises");
        let write = || -> std::io::Result<()> {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| JobsError::Write(path.clone(), e))
    }

    pub fn remove(&self, id: &str) -> Result<(), JobsError> {
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => {
                let _ = fs::File::open(&self.dir).and_then(|d| d.sync_all());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(JobsError::Remove(path, e)),
        }
    }

    /// Every readable record; damaged ones are returned as (file, reason) so the caller can
    /// report them rather than silently forget a job.
    #[allow(clippy::type_complexity)]
    pub fn load_all(&self) -> Result<(Vec<JobRecord>, Vec<(PathBuf, String)>), JobsError> {
        let mut good = BTreeMap::new();
        let mut bad = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| JobsError::Read(self.dir.clone(), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| JobsError::Read(self.dir.clone(), e))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                // A temporary file from a write that never finished.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) if valid_job_id(&r.id) && path == self.path(&r.id) => {
                    good.insert(r.id.clone(), r);
                }
                Ok(_) => bad.push((path, "the record's id does not match its file name".into())),
                Err(e) => bad.push((path, e)),
            }
        }
        Ok((good.into_values().collect(), bad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            runner: Some("runner-1".into()),
            created: OffsetDateTime::UNIX_EPOCH,
            deadline: OffsetDateTime::UNIX_EPOCH + time::Duration::hours(6),
            identity: None,
            token_sha256: "00".repeat(32),
            endpoint: "127.0.0.1:4000".parse().unwrap(),
            token_uid: 0,
            rule: None,
            aliases: vec![],
            refused: Some("no policy rule matches".into()),
            flags: vec![],
            sandbox_slot: None,
            owner: None,
        }
    }

    #[test]
    fn records_round_trip_and_are_private() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let id = new_job_id();
        assert!(valid_job_id(&id));
        s.save(&rec(&id)).unwrap();
        let (good, bad) = s.load_all().unwrap();
        assert_eq!(good, vec![rec(&id)]);
        assert!(bad.is_empty());
        let mode = fs::metadata(d.path().join("jobs"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        s.remove(&id).unwrap();
        assert!(s.load_all().unwrap().0.is_empty());
        s.remove(&id).unwrap();
    }

    #[test]
    fn damaged_records_are_reported_not_dropped_silently() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        fs::write(d.path().join("jobs/j-0000000000000001.json"), b"{not json").unwrap();
        fs::write(d.path().join("jobs/.j-1.tmp"), b"partial").unwrap();
        let mut r = rec("j-0000000000000002");
        s.save(&r).unwrap();
        r.id = "j-0000000000000003".into();
        fs::write(
            d.path().join("jobs/j-0000000000000004.json"),
            serde_json::to_vec(&r).unwrap(),
        )
        .unwrap();
        let (good, bad) = s.load_all().unwrap();
        assert_eq!(good.len(), 1);
        assert_eq!(bad.len(), 2);
        assert!(!d.path().join("jobs/.j-1.tmp").exists());
    }

    #[test]
    fn job_ids_from_clients_are_checked() {
        assert!(!valid_job_id("../../etc/passwd"));
        assert!(!valid_job_id("j-zzzzzzzzzzzzzzzz"));
        assert!(valid_job_id("j-0123456789abcdef"));
    }
}
