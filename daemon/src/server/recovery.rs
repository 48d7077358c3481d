//! What a starting server does with `.incoming/`: adopt uploads in flight, finish or
//! undo commits a crash interrupted, remember recent outcomes, and remove the rest.
//!
//! | found in the journal | `.part` | archive | action |
//! |---|---|---|---|
//! | `committed` | — | — | make sure the committed log has it; remove the journal |
//! | `commit` intent | present | — | verify the `.part` against the intent's SHA-256, install, rotate |
//! | `commit` intent | gone | present | verify the archive, (re)write its manifest, rotate |
//! | `commit` intent | gone | gone | nothing to recover; forget |
//! | chunks only | present | — | adopt: re-check chunks, re-hash, wait for the agent to re-join |
//! | anything | unreadable journal | | remove journal and `.part` |
//!
//! An archive that fails verification is deleted rather than left under a final name.
//! `.part` files without a journal, and leftovers of atomic writes, are removed.
//! Outcomes of recent commits come from the storage's committed log, which this also
//! compacts to the last `finished_ttl`.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use nbackup_protocol::manifest::hex;
use nbackup_protocol::wire::Committed;
use nbackup_protocol::{Name, SessionId};

use super::journal::{self, Journal};
use super::session::{Outcome, Session, committed_entry, done_record, rotate_logged};
use super::storage::StorageArea;
use crate::fsutil;
use crate::restore::verify_against_manifest;

/// The result of scanning one storage.
#[derive(Default)]
pub struct Recovered {
    pub sessions: Vec<Session>,
    /// (session, owner, outcome, age)
    pub finished: Vec<(SessionId, Name, Outcome, Duration)>,
}

/// Scans `area`'s `.incoming`. Never fails: whatever cannot be used is removed and
/// logged, so a damaged leftover cannot keep the server from starting.
pub fn recover(area: &Arc<StorageArea>, finished_ttl: Duration) -> Recovered {
    let mut out = Recovered::default();
    let incoming = area.incoming_dir();
    let Ok(entries) = fs::read_dir(&incoming) else { return out };
    let mut journals = Vec::new();
    let mut others = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "journal") {
            journals.push(p);
        } else if p.file_name().is_some_and(|n| n != super::storage::COMMITTED_LOG) {
            others.push(p);
        }
    }
    for path in &journals {
        if let Err(e) = recover_one(area, path, &mut out) {
            warn!(journal = %path.display(), "cannot recover upload, removing it: {e}");
            remove(&path.with_extension("part"));
            remove(path);
        }
    }
    // Uploads with no journal (or whose journal was just removed) cannot be adopted.
    for p in others {
        if p.exists() && !(p.extension().is_some_and(|x| x == "part") && p.with_extension("journal").exists()) {
            info!(path = %p.display(), "removing stale upload file");
            remove(&p);
        }
    }
    match area.recent_commits(finished_ttl) {
        Ok(entries) => {
            let now = super::storage::unix_now();
            for e in entries {
                let (Some(id), Ok(agent), Ok(sha256)) =
                    (SessionId::from_hex(&e.session), Name::new(e.agent.as_str()), parse_sha(&e.sha256))
                else {
                    continue;
                };
                let c = Committed { archive: e.archive, size: e.size, sha256 };
                out.finished.push((id, agent, Outcome::Committed(c), Duration::from_secs(now.saturating_sub(e.at))));
            }
        }
        Err(e) => warn!(storage = %area.cfg.name, "cannot read the committed log: {e}"),
    }
    out
}

fn remove(p: &Path) {
    if let Err(e) = fsutil::remove_if_exists(p) {
        warn!(path = %p.display(), "cannot remove: {e}");
    }
}

fn recover_one(area: &Arc<StorageArea>, path: &Path, out: &mut Recovered) -> std::io::Result<()> {
    let contents = Journal::read(path)?;
    let h = &contents.header;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    if h.storage != area.cfg.name.as_str() {
        return Err(bad(format!("journal of storage {:?} found in storage {}", h.storage, area.cfg.name)));
    }
    let id = SessionId::from_hex(&h.session).ok_or_else(|| bad("bad session id".into()))?;
    let agent = Name::new(h.agent.as_str()).map_err(|e| bad(e.to_string()))?;
    let backup = Name::new(h.backup.as_str()).map_err(|e| bad(e.to_string()))?;
    let part = path.with_extension("part");

    if let Some(done) = &contents.done {
        // Crashed between recording completion and writing the committed log.
        let c = committed(done)?;
        area.record_committed(&committed_entry(&id, &agent, &c))?;
        remove(path);
        remove(&part);
        return Ok(());
    }

    if let Some(intent) = &contents.intent {
        let archive = area.entry_dir(&agent, &backup).join(&intent.archive);
        if part.exists() {
            match verify_against_manifest(&part, &intent.manifest)? {
                Ok(()) => {
                    let file = fs::File::open(&part)?;
                    area.install(&part, &file, &agent, &backup, &intent.manifest)?;
                }
                Err(why) => return Err(bad(format!("upload does not match its commit: {why}"))),
            }
        } else if archive.exists() {
            if let Err(why) = verify_against_manifest(&archive, &intent.manifest)? {
                warn!(archive = %archive.display(), "removing archive that fails verification: {why}");
                remove(&archive);
                return Err(bad(why));
            }
            area.write_manifest(&archive, &intent.manifest)?;
        } else {
            return Err(bad("commit intent without upload or archive".into()));
        }
        info!(session = %id, archive = %archive.display(), "finished a commit interrupted by a restart");
        let _ = rotate_logged(area, &agent, &backup);
        let c = Committed {
            archive: intent.archive.clone(),
            size: intent.manifest.size,
            sha256: parse_sha(&intent.manifest.sha256)?,
        };
        Journal::reopen(path)?.done(&done_record(&c))?;
        area.record_committed(&committed_entry(&id, &agent, &c))?;
        remove(path);
        return Ok(());
    }

    if !part.exists() {
        return Err(bad("journal without upload".into()));
    }
    let session = Session::adopt(&contents, area.clone())?;
    info!(
        session = %id, agent = %agent, backup = %backup,
        chunks = contents.chunks.len(), contiguous = session.contiguous(),
        "adopted upload in flight; waiting for the agent to re-join"
    );
    out.sessions.push(session);
    Ok(())
}

fn parse_sha(s: &str) -> std::io::Result<[u8; 32]> {
    let id = |i: usize| s.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok());
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = id(i).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad sha256"))?;
    }
    if s.len() != 64 || hex(&out) != s {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad sha256"));
    }
    Ok(out)
}

fn committed(d: &journal::Done) -> std::io::Result<Committed> {
    Ok(Committed { archive: d.archive.clone(), size: d.size, sha256: parse_sha(&d.sha256)? })
}
