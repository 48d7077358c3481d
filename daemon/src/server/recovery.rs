//! What a starting server does with `.incoming/`: adopt uploads in flight, finish or
//! undo commits a crash (or a stop) interrupted, remember recent outcomes, and remove
//! the rest.
//!
//! It runs in two steps so that a start never waits on the size of what is there:
//! [`scan`], before readiness, reads only each journal's first line and registers the
//! session as `recovering` (its entry locked; joins are answered "retry shortly");
//! [`run`], after readiness, does the heavy part — re-reading chunks, verifying
//! interrupted commits — on blocking threads, and hands each session to the registry.
//!
//! | found in the journal | `.part` | archive | action |
//! |---|---|---|---|
//! | `committed` | — | — | make sure the committed log has it; remove the journal |
//! | `commit` intent | present | — | verify the `.part` against the intent's SHA-256, install, rotate |
//! | `commit` intent | gone | present | verify the archive, (re)write its manifest, rotate |
//! | `commit` intent | gone | gone | nothing to recover; forget |
//! | chunks only | present | — | adopt: re-check chunks, wait for the agent to re-join |
//! | anything | unreadable journal | | remove journal and `.part` |
//!
//! An archive that fails verification is deleted rather than left under a final name.
//! `.part` files without a journal, and leftovers of atomic writes, are removed.

use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use nbackup_protocol::manifest::hex;
use nbackup_protocol::wire::Committed;
use nbackup_protocol::{Name, SessionId};

use super::Server;
use super::journal::{self, Journal};
use super::registry::{FINISHED_TTL, Outcome};
use super::session::{Session, SessionParams, committed_entry, done_record};
use super::storage::StorageArea;
use crate::fsutil;
use crate::restore::verify_against_manifest;

/// One journal found by [`scan`], for [`run`].
pub struct Pending {
    area: Arc<StorageArea>,
    journal: PathBuf,
    id: SessionId,
}

/// Registers what every storage's `.incoming` holds; cheap (first lines only).
pub fn scan(server: &Server) -> Vec<Pending> {
    let mut pending = Vec::new();
    for area in server.live().storages.values() {
        scan_one(server, area, &mut pending);
    }
    pending
}

fn scan_one(server: &Server, area: &Arc<StorageArea>, pending: &mut Vec<Pending>) {
    let incoming = area.incoming_dir();
    let Ok(entries) = fs::read_dir(&incoming) else { return };
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
    for path in journals {
        match header(&path).and_then(|h| params(area, &h)) {
            Ok(params) => {
                let id = params.id;
                server.registry.recovering(params);
                pending.push(Pending { area: area.clone(), journal: path, id });
            }
            Err(e) => {
                warn!(journal = %path.display(), "cannot recover upload, removing it: {e}");
                remove(&path.with_extension("part"));
                remove(&path.with_extension("catalog"));
                remove(&path);
            }
        }
    }
    // Uploads with no journal cannot be adopted; temp files are leftovers.
    for p in others {
        let upload = p.extension().is_some_and(|x| x == "part" || x == "catalog");
        if p.to_string_lossy().ends_with(super::storage::ROTATED) {
            info!(path = %p.display(), "removing an archive rotated out before the restart");
            remove(&p);
        } else if !(upload && p.with_extension("journal").exists()) {
            info!(path = %p.display(), "removing stale upload file");
            remove(&p);
        }
    }
    match area.recent_commits(FINISHED_TTL) {
        Ok(entries) => {
            let now = crate::state::unix_now();
            for e in entries {
                let (Some(id), Ok(agent), Ok(sha256)) =
                    (SessionId::from_hex(&e.session), Name::new(e.agent.as_str()), parse_sha(&e.sha256))
                else {
                    continue;
                };
                let c = Committed { archive: e.archive, size: e.size, sha256 };
                let age = Duration::from_secs(now.saturating_sub(e.at));
                server.registry.recovery_finished(id, Some((agent, Outcome::Committed(c), age)));
            }
        }
        Err(e) => warn!(storage = %area.cfg.name, "cannot read the committed log: {e}"),
    }
}

/// The journal's first record, read alone.
fn header(path: &Path) -> std::io::Result<journal::Header> {
    let mut line = String::new();
    std::io::BufReader::new(fs::File::open(path)?).read_line(&mut line)?;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let json = line.strip_suffix('\n').and_then(|l| l.strip_prefix("open ")).ok_or_else(|| bad("no header".into()))?;
    serde_json::from_str(json).map_err(|e| bad(e.to_string()))
}

fn params(area: &StorageArea, h: &journal::Header) -> std::io::Result<SessionParams> {
    if h.storage != area.cfg.name.as_str() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("journal of storage {:?} found in storage {}", h.storage, area.cfg.name),
        ));
    }
    SessionParams::from_header(h)
}

/// Re-checks everything [`scan`] registered, one blocking task per upload.
pub async fn run(server: Arc<Server>, pending: Vec<Pending>) {
    for p in pending {
        let s = server.clone();
        server.tracker.spawn(async move {
            let (id, journal) = (p.id, p.journal.clone());
            let result = tokio::task::spawn_blocking(move || recover_one(&p.area, &p.journal)).await;
            match result {
                Ok(Ok(Recovered::Adopted(session))) => {
                    info!(
                        session = %id, agent = %session.params.key.agent, backup = %session.params.key.backup,
                        contiguous = session.contiguous(), "adopted upload in flight; waiting for the agent to re-join"
                    );
                    s.registry.adopted(*session);
                }
                Ok(Ok(Recovered::Finished(agent, c))) => {
                    s.registry.recovery_finished(id, Some((agent, Outcome::Committed(c), Duration::ZERO)));
                }
                Ok(Err(e)) => {
                    warn!(journal = %journal.display(), "cannot recover upload, removing it: {e}");
                    remove(&journal.with_extension("part"));
                    remove(&journal.with_extension("catalog"));
                    remove(&journal);
                    s.registry.recovery_finished(id, None);
                }
                Err(e) => {
                    warn!(journal = %journal.display(), "recovery task failed: {e}");
                    s.registry.recovery_finished(id, None);
                }
            }
        });
    }
}

enum Recovered {
    Adopted(Box<Session>),
    Finished(Name, Committed),
}

fn remove(p: &Path) {
    if let Err(e) = fsutil::remove_if_exists(p) {
        warn!(path = %p.display(), "cannot remove: {e}");
    }
}

fn recover_one(area: &Arc<StorageArea>, path: &Path) -> std::io::Result<Recovered> {
    let contents = Journal::read(path)?;
    let h = &contents.header;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let p = params(area, h)?;
    let (id, agent, backup) = (p.id, p.key.agent.clone(), p.key.backup.clone());
    let part = path.with_extension("part");

    if let Some(done) = &contents.done {
        // Crashed between recording completion and writing the committed log.
        let c = committed(done)?;
        area.record_committed(&committed_entry(&id, &agent, &c))?;
        remove(path);
        remove(&part);
        remove(&path.with_extension("catalog"));
        return Ok(Recovered::Finished(agent, c));
    }

    if let Some(intent) = &contents.intent {
        let archive = area.entry_dir(&agent, &backup).join(&intent.archive);
        // A catalog still in `.incoming` was verified before the intent was written.
        let catalog = path.with_extension("catalog");
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
            area.place_catalog(&catalog, &archive)?;
            area.settle(&archive, &intent.manifest)?;
        } else {
            return Err(bad("commit intent without upload or archive".into()));
        }
        info!(session = %id, archive = %archive.display(), "finished a commit interrupted by a restart");
        if let Err(e) = area.rotate(&agent, &backup, Some(&intent.archive)) {
            warn!(%agent, %backup, "rotation failed: {e}");
        }
        area.purge_rotated();
        let c = Committed {
            archive: intent.archive.clone(),
            size: intent.manifest.size,
            sha256: parse_sha(&intent.manifest.sha256)?,
        };
        Journal::reopen(path)?.done(&done_record(&c))?;
        area.record_committed(&committed_entry(&id, &agent, &c))?;
        remove(path);
        return Ok(Recovered::Finished(agent, c));
    }

    if !part.exists() {
        return Err(bad("journal without upload".into()));
    }
    Ok(Recovered::Adopted(Box::new(Session::adopt(&contents, area.clone())?)))
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
