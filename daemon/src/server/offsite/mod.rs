//! Off-site copies of committed archives, to the buckets of their storage.
//!
//! One runner per (storage, bucket) uploads the archives that bucket is owed, oldest
//! first, one at a time (its parts in parallel). What is owed is on disk: each
//! archive's `<archive>.offsite.json` ([`state::Copies`]), written by the commit, so a
//! restart, crash or outage only delays a copy. A runner finds its work by scanning
//! the storage when it starts and is told of each new commit; a failed upload is
//! retried with a growing pause (2 s doubling to 5 min), resuming from the last part
//! the provider acknowledged. Rotation never removes an archive a configured bucket
//! is still owed; once the copy is verified the runner lets rotation catch up.
//!
//! Runners are reconciled with the configuration at start and at every reload: an
//! unchanged bucket keeps its runner (and its upload in flight), a changed one is
//! restarted, a removed one stopped.

pub mod background;
pub mod client;
pub mod lock;
pub mod objects;
pub mod state;
pub mod upload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::config::Bucket;
use nbackup_protocol::manifest::Manifest;

use super::Server;
use super::storage::{StorageArea, sidecar_path};
use state::{Copies, Copy, CopyState};

/// Longest pause between two attempts of one upload.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Failed attempts of one copy after which it is raised (`offsite_failed`).
const FAILED_AFTER: u32 = 3;
/// An idle runner looks for owed copies it was not told of this often (commits
/// finished by a recovery, sidecars restored by hand).
const RESCAN: Duration = Duration::from_secs(300);
/// A retention pass that failed is tried again this often while the runner is idle
/// (and after each copy).
const PRUNE_RETRY: Duration = Duration::from_secs(15);

/// The runners, by storage and bucket.
#[derive(Default)]
pub struct Offsite {
    runners: Mutex<BTreeMap<(Name, Name), Runner>>,
    /// The server the runners work for (set by [`Offsite::start`]).
    server: std::sync::OnceLock<Weak<Server>>,
}

struct Runner {
    bucket: Bucket,
    /// The storage it copies from (kept so a removed bucket's uploads can be aborted
    /// even when its storage went with it).
    area: Arc<StorageArea>,
    task: tokio::task::JoinHandle<()>,
    tx: mpsc::UnboundedSender<PathBuf>,
    stop: CancellationToken,
    stats: Arc<Mutex<Stats>>,
    meter: Arc<client::Meter>,
}

/// What a runner owes: its queue (oldest queued first) and, read by status and
/// metrics, how it is going.
#[derive(Default)]
struct Stats {
    /// Archive → (unix seconds queued, failed its last attempt).
    owed: BTreeMap<PathBuf, (u64, bool)>,
    last_error: Option<String>,
    /// `offsite_lagging` was raised and not yet answered by `offsite_caught_up`.
    lagging: bool,
}

/// A change in whether a bucket keeps up.
#[derive(Debug, PartialEq, Eq)]
enum Lag {
    /// The oldest of `owed` copies has waited `secs`.
    Behind {
        secs: u64,
        owed: usize,
    },
    CaughtUp,
}

impl Stats {
    /// Whether the bucket just fell behind `alert_after` or caught up again, at unix
    /// second `now`; `None` while nothing changed.
    fn lag(&mut self, alert_after: Duration, now: u64) -> Option<Lag> {
        let oldest = self.owed.values().map(|(at, _)| now.saturating_sub(*at)).max().unwrap_or(0);
        let behind = oldest >= alert_after.as_secs();
        match (behind, self.lagging) {
            (true, false) => {
                self.lagging = true;
                Some(Lag::Behind { secs: oldest, owed: self.owed.len() })
            }
            (false, true) => {
                self.lagging = false;
                Some(Lag::CaughtUp)
            }
            _ => None,
        }
    }

    /// The copy to make next: the oldest queued.
    fn next(&self) -> Option<PathBuf> {
        self.owed.iter().min_by_key(|(p, (at, _))| (*at, *p)).map(|(p, _)| p.clone())
    }
}

impl Offsite {
    /// Starts a runner for every configured bucket.
    pub(crate) fn start(&self, server: &Arc<Server>) {
        let _ = self.server.set(Arc::downgrade(server));
        self.reconcile(server);
    }

    /// Starts, keeps or stops runners so that there is one per configured bucket
    /// (at start and after each reload).
    pub(crate) fn reconcile(&self, server: &Server) {
        let Some(weak) = self.server.get() else { return };
        let live = server.live();
        let mut wanted: BTreeMap<(Name, Name), Bucket> = BTreeMap::new();
        for (storage, area) in &live.storages {
            for b in &area.cfg.buckets {
                wanted.insert((storage.clone(), b.name.clone()), b.clone());
            }
        }
        let mut runners = crate::lock(&self.runners);
        let gone: Vec<(Name, Name)> =
            runners.iter().filter(|(k, r)| wanted.get(*k) != Some(&r.bucket)).map(|(k, _)| k.clone()).collect();
        for key in gone {
            let Some(r) = runners.remove(&key) else { continue };
            r.stop.cancel();
            // A changed bucket's new runner resumes its uploads; a removed one's
            // would be left open on the provider, accruing cost.
            if !wanted.contains_key(&key) {
                server.tracker.spawn(abandon(r.area, r.bucket, r.task));
            }
        }
        for (key, bucket) in wanted {
            if runners.contains_key(&key) {
                continue;
            }
            let Some(area) = live.storages.get(&key.0).cloned() else { continue };
            let remote = match client::connect(&bucket) {
                Ok(r) => r,
                Err(e) => {
                    warn!(storage = %key.0, bucket = %key.1, "off-site copies disabled for this bucket: {e}");
                    continue;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let stop = server.shutdown.child_token();
            let stats = Arc::new(Mutex::new(Stats::default()));
            let meter = remote.meter.clone();
            let work = Work {
                server: weak.clone(),
                storage: key.0.clone(),
                bucket: bucket.clone(),
                remote,
                stats: stats.clone(),
                manifests: objects::Manifests::default(),
                unpruned: Mutex::default(),
            };
            let task = server.tracker.spawn(work.run(rx, stop.clone()));
            if let Some(after) = bucket.alert_after {
                let (weak, storage, name, stats) = (weak.clone(), key.0.clone(), key.1.clone(), stats.clone());
                server.tracker.spawn(watch_lag(weak, storage, name, after, stats, stop.clone()));
            }
            runners.insert(key, Runner { bucket, area, task, tx, stop, stats, meter });
        }
    }

    /// Each bucket of `storage`, as the admin API shows it.
    pub fn status(&self, storage: &Name) -> Vec<nbackup_protocol::admin::BucketStatus> {
        let now = crate::state::unix_now();
        crate::lock(&self.runners)
            .iter()
            .filter(|((s, _), _)| s == storage)
            .map(|((_, name), r)| {
                let st = crate::lock(&r.stats);
                nbackup_protocol::admin::BucketStatus {
                    name: name.to_string(),
                    provider: r.bucket.provider.to_string(),
                    bucket: r.bucket.bucket.clone(),
                    mode: r.bucket.mode.name().to_string(),
                    owed: st.owed.len() as u64,
                    failing: st.owed.values().filter(|(_, failed)| *failed).count() as u64,
                    oldest_owed_secs: st.owed.values().map(|(at, _)| now.saturating_sub(*at)).max(),
                    sent_bytes: r.meter.sent(),
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }

    /// `nbackup ctl sync`: for each selected bucket, queues every archive on disk
    /// whose off-site state does not name it (committed before the bucket was
    /// configured, or its sidecar lost) and tells the bucket's runner, which copies
    /// it — or finds it already in the bucket and only verifies it. Returns, per
    /// bucket, how many were queued now and how many were owed already. Blocking
    /// (reads every archive's sidecar).
    pub(crate) fn sync(
        &self,
        server: &Server,
        storage: Option<&str>,
        bucket: Option<&str>,
    ) -> Result<Vec<(String, String, u64, u64)>, super::handle::HandleError> {
        use super::handle::HandleError;
        let live = server.live();
        let areas: Vec<&Arc<StorageArea>> =
            live.storages.values().filter(|a| storage.is_none_or(|s| a.cfg.name.as_str() == s)).collect();
        if let (Some(s), true) = (storage, areas.is_empty()) {
            return Err(HandleError::NotFound(format!("no storage {s}")));
        }
        let now = crate::state::unix_now();
        let mut report = Vec::new();
        for area in areas {
            for b in area.cfg.buckets.iter().filter(|b| bucket.is_none_or(|n| b.name.as_str() == n)) {
                let (mut queued, mut owed) = (0u64, 0u64);
                let tx = crate::lock(&self.runners).get(&(area.cfg.name.clone(), b.name.clone())).map(|r| r.tx.clone());
                for (agent, backup) in area.entries().map_err(|e| HandleError::Unavailable(e.to_string()))? {
                    let Ok(archives) = area.list(&agent, &backup) else { continue };
                    for a in archives {
                        let copy =
                            Copies::load(&a.path).ok().flatten().and_then(|c| c.buckets.get(b.name.as_str()).cloned());
                        match copy {
                            Some(c) if c.is_settled() => continue,
                            Some(_) => owed += 1,
                            None => {
                                area.update_copies(&a.path, b.name.as_str(), Copy::queued(now))
                                    .map_err(|e| HandleError::Unavailable(format!("{}: {e}", a.path.display())))?;
                                queued += 1;
                            }
                        }
                        if let Some(tx) = &tx {
                            let _ = tx.send(a.path.clone());
                        }
                    }
                }
                report.push((area.cfg.name.to_string(), b.name.to_string(), queued, owed));
            }
        }
        if let (Some(n), true) = (bucket, report.is_empty()) {
            return Err(HandleError::NotFound(format!("no bucket {n} in the storages named")));
        }
        Ok(report)
    }

    /// Tells the storage's runners of an archive just committed.
    pub fn committed(&self, storage: &Name, archive: &Path) {
        for ((s, _), r) in crate::lock(&self.runners).iter() {
            if s == storage {
                let _ = r.tx.send(archive.to_path_buf());
            }
        }
    }
}

/// Raises `offsite_lagging` once a bucket's oldest owed copy has waited longer than
/// `alert_after`, and `offsite_caught_up` once it no longer has; apart from the
/// runner, so that a long upload in progress does not hide the lag.
async fn watch_lag(
    server: Weak<Server>,
    storage: Name,
    bucket: Name,
    alert_after: Duration,
    stats: Arc<Mutex<Stats>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval((alert_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let change = crate::lock(&stats).lag(alert_after, crate::state::unix_now());
        let Some(change) = change else { continue };
        let Some(server) = server.upgrade() else { return };
        let (kind, message) = match change {
            Lag::Behind { secs, owed } => {
                warn!(%storage, %bucket, owed, "off-site copies are behind: the oldest owed has waited {secs} s");
                (
                    nbackup_protocol::admin::EventKind::OffsiteLagging,
                    format!(
                        "{storage}/{bucket}: {owed} archive(s) not yet copied, the oldest queued {} ago \
                         (alert_after {}); the disk keeps them meanwhile",
                        age(secs),
                        nbackup_protocol::config::HumanDuration(alert_after)
                    ),
                )
            }
            Lag::CaughtUp => {
                info!(%storage, %bucket, "off-site copies caught up");
                (
                    nbackup_protocol::admin::EventKind::OffsiteCaughtUp,
                    format!("{storage}/{bucket}: caught up, nothing owed for longer than its alert_after"),
                )
            }
        };
        let name = format!("{storage}/{bucket}");
        let who = crate::state::EventSpec { bucket: Some(&name), ..Default::default() };
        server.telemetry.events.record(kind, who, message);
    }
}

/// `3d 4h`, `2h 5m`, `7m 12s`, `40s`.
fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Aborts, on the provider, every multipart upload to a bucket that was removed from
/// the configuration, and forgets it in the archives' off-site state (so the bucket,
/// if added again, starts those copies afresh).
async fn abandon(area: Arc<StorageArea>, bucket: Bucket, runner: tokio::task::JoinHandle<()>) {
    // The runner stops first, so it records nothing after the uploads are taken.
    let _ = runner.await;
    let name = bucket.name.to_string();
    let scan = {
        let (area, name) = (area.clone(), name.clone());
        tokio::task::spawn_blocking(move || open_uploads(&area, &name)).await.unwrap_or_default()
    };
    if scan.is_empty() {
        return;
    }
    let remote = match client::connect(&bucket) {
        Ok(r) => r,
        Err(e) => {
            warn!(bucket = %name, "cannot abort the uploads of a removed bucket: {e}");
            return;
        }
    };
    for archive in scan {
        let (a, n) = (area.clone(), name.clone());
        let taken = tokio::task::spawn_blocking(move || a.take_upload(&archive, &n)).await;
        let m = match taken {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                warn!(bucket = %name, "cannot read an archive's off-site state: {e}");
                continue;
            }
            Err(_) => continue,
        };
        match remote.multipart.abort_multipart(&object_store::path::Path::from(m.key.as_str()), &m.id).await {
            Ok(()) => info!(bucket = %name, key = %m.key, "aborted the upload to a bucket no longer configured"),
            Err(e) => {
                warn!(bucket = %name, key = %m.key, "cannot abort an upload to a removed bucket (set a lifecycle rule): {e}")
            }
        }
    }
}

/// Archives of `area` with a multipart upload to `bucket` in progress.
fn open_uploads(area: &StorageArea, bucket: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = area.entries() else { return found };
    for (agent, backup) in entries {
        let Ok(archives) = area.list(&agent, &backup) else { continue };
        for a in archives {
            if let Ok(Some(c)) = Copies::load(&a.path)
                && let Some(copy) = c.buckets.get(bucket)
                && copy.upload.is_some()
            {
                found.push(a.path);
            }
        }
    }
    found
}

/// Names of the buckets an archive of `area` is owed by, for the commit.
pub fn owed_by(area: &StorageArea) -> Vec<&str> {
    area.cfg.buckets.iter().map(|b| b.name.as_str()).collect()
}

/// Whether `archive` may leave local disk: every bucket configured now has verified
/// its copy (an archive committed before its storage had buckets owes nothing; a
/// bucket removed from the configuration is owed nothing).
pub fn may_remove(area: &StorageArea, archive: &Path) -> Result<(), String> {
    if area.cfg.buckets.is_empty() {
        return Ok(());
    }
    let copies = match Copies::load(archive) {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(()),
        Err(e) => return Err(format!("its off-site state is unreadable ({e})")),
    };
    let pending: Vec<&str> =
        copies.pending().into_iter().filter(|n| area.cfg.buckets.iter().any(|b| b.name.as_str() == *n)).collect();
    if pending.is_empty() { Ok(()) } else { Err(format!("not yet copied to {}", pending.join(", "))) }
}

struct Work {
    server: Weak<Server>,
    storage: Name,
    bucket: Bucket,
    remote: client::Remote,
    stats: Arc<Mutex<Stats>>,
    /// Manifests read back from the bucket by its retention passes.
    manifests: objects::Manifests,
    /// Entries whose last retention pass failed, to be tried again.
    unpruned: Mutex<std::collections::BTreeSet<(Name, Name)>>,
}

impl Work {
    fn area(&self) -> Option<Arc<StorageArea>> {
        self.server.upgrade()?.live().storages.get(&self.storage).cloned()
    }

    async fn run(self, mut rx: mpsc::UnboundedReceiver<PathBuf>, stop: CancellationToken) {
        let Some(found) = self.scan().await else { return };
        self.enqueue(found);
        let owed = crate::lock(&self.stats).owed.len();
        info!(storage = %self.storage, bucket = %self.bucket.name, owed, "off-site copies started");
        let mut failures = 0u32;
        loop {
            while let Ok(p) = rx.try_recv() {
                self.enqueue(vec![(crate::state::unix_now(), p)]);
            }
            let next = crate::lock(&self.stats).next();
            let Some(archive) = next else {
                let retry_prunes = !crate::lock(&self.unpruned).is_empty();
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(PRUNE_RETRY), if retry_prunes => self.prune_again().await,
                    p = rx.recv() => match p {
                        Some(p) => self.enqueue(vec![(crate::state::unix_now(), p)]),
                        None => return,
                    },
                    _ = tokio::time::sleep(RESCAN) => {
                        let Some(found) = self.scan().await else { return };
                        self.enqueue(found);
                    }
                }
                continue;
            };
            let outcome = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.copy(&archive) => r,
            };
            match outcome {
                Ok(()) => {
                    failures = 0;
                    crate::lock(&self.stats).owed.remove(&archive);
                    self.prune_again().await;
                }
                Err(Retry::Never(why)) => {
                    warn!(storage = %self.storage, bucket = %self.bucket.name, archive = %archive.display(), "not copied: {why}");
                    crate::lock(&self.stats).owed.remove(&archive);
                }
                Err(Retry::Later(why)) => {
                    failures += 1;
                    {
                        let mut st = crate::lock(&self.stats);
                        if let Some(e) = st.owed.get_mut(&archive) {
                            e.1 = true;
                        }
                        st.last_error = Some(why.clone());
                    }
                    let pause = Duration::from_secs(1u64 << failures.min(9)).min(MAX_BACKOFF);
                    warn!(
                        storage = %self.storage, bucket = %self.bucket.name, archive = %archive.display(),
                        attempt = failures, "off-site copy failed, retrying in {pause:?}: {why}"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    fn enqueue(&self, found: Vec<(u64, PathBuf)>) {
        let mut st = crate::lock(&self.stats);
        for (at, p) in found {
            st.owed.entry(p).or_insert((at, false));
        }
    }

    fn event(&self, kind: nbackup_protocol::admin::EventKind, m: &Manifest, message: String) {
        if let Some(server) = self.server.upgrade() {
            let who = crate::state::EventSpec { agent: Some(&m.agent), backup: Some(&m.backup), ..Default::default() };
            server.telemetry.events.record(kind, who, message);
        }
    }

    /// What this bucket is owed, oldest first; `None` once the storage is gone.
    async fn scan(&self) -> Option<Vec<(u64, PathBuf)>> {
        let area = self.area()?;
        let bucket = self.bucket.name.to_string();
        Some(tokio::task::spawn_blocking(move || owed(&area, &bucket)).await.unwrap_or_default())
    }

    /// Copies one archive, if it is still owed.
    async fn copy(&self, archive: &Path) -> Result<(), Retry> {
        let Some(area) = self.area() else { return Err(Retry::Never("its storage is gone".into())) };
        let name = self.bucket.name.to_string();
        let path = archive.to_path_buf();
        let (manifest, copies) = match tokio::task::spawn_blocking(move || read(&path)).await {
            Ok(Ok(Some(v))) => v,
            Ok(Ok(None)) => return Err(Retry::Never("the archive or its manifest is gone".into())),
            Ok(Err(e)) => return Err(Retry::Later(e)),
            Err(e) => return Err(Retry::Later(e.to_string())),
        };
        let mut copy = match copies.buckets.get(&name) {
            Some(c) if c.is_settled() => return Ok(()),
            Some(c) => c.clone(),
            None => return Ok(()),
        };
        let key = self.bucket.key(&manifest.agent, &manifest.backup, &manifest.archive);
        // Not begun yet, and the retention would delete it at once: not uploaded.
        if let Some(retention) = self.bucket.retention
            && copy.upload.is_none()
            && !self.wanted(retention, &area, &manifest).await?
        {
            copy.state = CopyState::NotKept;
            copy.error = None;
            let (area, path, bucket) = (area.clone(), archive.to_path_buf(), name.clone());
            tokio::task::spawn_blocking(move || area.update_copies(&path, &bucket, copy))
                .await
                .map_err(|e| Retry::Later(e.to_string()))?
                .map_err(|e| Retry::Later(e.to_string()))?;
            info!(
                storage = %self.storage, bucket = %self.bucket.name, archive = %manifest.archive,
                "not uploaded: the bucket's retention keeps newer archives of this entry instead"
            );
            return Ok(());
        }
        let (lock, path, bucket) = (area.clone(), archive.to_path_buf(), name.clone());
        let save = move |c: Copy| -> futures_util::future::BoxFuture<'static, std::io::Result<()>> {
            let (area, path, bucket) = (lock.clone(), path.clone(), bucket.clone());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || area.update_copies(&path, &bucket, c))
                    .await
                    .map_err(std::io::Error::other)?
            })
        };
        let server = self.server.clone();
        let busy = move || server.upgrade().is_some_and(|s| s.registry.receiving() > 0);
        let job = upload::Job {
            remote: &self.remote,
            bucket: &self.bucket,
            archive,
            manifest: &manifest,
            key: &key,
            ingesting: &busy,
        };
        let result = upload::upload(&job, &mut copy, &save).await;
        match result {
            Ok(sent) => {
                copy.state = CopyState::Verified;
                copy.verified_at = Some(crate::state::unix_now());
                copy.upload = None;
                copy.error = None;
                copy.e_tag = sent.e_tag;
                copy.locked_until = sent.locked_until;
                save(copy).await.map_err(|e| Retry::Later(e.to_string()))?;
                let how = if sent.already_there { "already in bucket" } else { "copied to bucket" };
                info!(
                    storage = %self.storage, bucket = %self.bucket.name, key, bytes = manifest.size,
                    already_there = sent.already_there, "archive off-site and verified"
                );
                self.event(
                    nbackup_protocol::admin::EventKind::OffsiteCopied,
                    &manifest,
                    format!("{} {how} {} ({key}) and verified", manifest.archive, self.bucket.name),
                );
                let (agent, backup) = (Name::new(manifest.agent.as_str()), Name::new(manifest.backup.as_str()));
                if let (Ok(agent), Ok(backup), Some(retention)) = (&agent, &backup, self.bucket.retention) {
                    self.prune(retention, agent, backup).await;
                }
                // Rotation may have kept it (and older ones) waiting for this copy.
                if let (Ok(agent), Ok(backup)) = (agent, backup) {
                    let area = area.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        match area.rotate(&agent, &backup, None) {
                            Ok(rotated) => {
                                for archive in rotated {
                                    info!(%agent, %backup, %archive, "rotated out");
                                }
                            }
                            Err(e) => warn!(%agent, %backup, "rotation after an off-site copy failed: {e}"),
                        }
                        area.purge_rotated();
                    })
                    .await;
                }
                Ok(())
            }
            Err(e) => {
                let restart = e.restarts();
                if restart && let Some(m) = copy.upload.take() {
                    let _ = self.remote.multipart.abort_multipart(&object_store::path::Path::from(m.key), &m.id).await;
                }
                copy.state = CopyState::Failed;
                copy.attempts += 1;
                copy.error = Some(e.to_string());
                if copy.attempts == FAILED_AFTER {
                    self.event(
                        nbackup_protocol::admin::EventKind::OffsiteFailed,
                        &manifest,
                        format!(
                            "{} not copied to bucket {} after {FAILED_AFTER} attempts (still retrying; kept locally): {e}",
                            manifest.archive, self.bucket.name
                        ),
                    );
                }
                let _ = save(copy).await;
                Err(Retry::Later(e.to_string()))
            }
        }
    }
}

impl Work {
    /// Whether the bucket's retention would keep this archive among what the bucket
    /// holds of its entry and what the disk still owes it (archives queued behind an
    /// outage, or by `ctl sync`, count as if they were there already).
    async fn wanted(
        &self,
        retention: nbackup_protocol::retention::Retention,
        area: &Arc<StorageArea>,
        manifest: &Manifest,
    ) -> Result<bool, Retry> {
        let (Ok(agent), Ok(backup)) = (Name::new(manifest.agent.as_str()), Name::new(manifest.backup.as_str())) else {
            return Ok(true);
        };
        let later = |e: object_store::Error| Retry::Later(e.to_string());
        let listing = objects::list(&self.remote, &self.bucket, &agent, Some(&backup)).await.map_err(later)?;
        let mut names = std::collections::BTreeSet::new();
        let mut candidates = Vec::new();
        for o in &listing.archives {
            let m = self.manifests.get(&self.remote, &o.key).await.map_err(later)?;
            candidates.push(objects::candidate(&o.stamp, o.n, o.modified, m.as_deref()));
            names.insert(o.name.clone());
        }
        let (area, bucket, a, b) = (area.clone(), self.bucket.name.to_string(), agent.clone(), backup.clone());
        let local = tokio::task::spawn_blocking(move || {
            let files = area.list(&a, &b).unwrap_or_default();
            files
                .into_iter()
                .filter(|f| {
                    Copies::load(&f.path)
                        .ok()
                        .flatten()
                        .and_then(|c| c.buckets.get(&bucket).cloned())
                        .is_some_and(|c| !c.is_settled())
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Retry::Later(e.to_string()))?;
        let mut me = listing.archives.iter().position(|o| o.name == manifest.archive);
        for f in local {
            if names.contains(&f.name) {
                continue;
            }
            if f.name == manifest.archive {
                me = Some(candidates.len());
            }
            candidates.push(objects::candidate(&f.stamp, f.n, chrono::Utc::now(), f.manifest.as_ref()));
        }
        Ok(me.is_none_or(|i| retention.keep(&candidates).contains(&i)))
    }

    /// Retention passes that failed, once more.
    async fn prune_again(&self) {
        let Some(retention) = self.bucket.retention else { return };
        let due: Vec<(Name, Name)> = crate::lock(&self.unpruned).iter().cloned().collect();
        for (agent, backup) in due {
            self.prune(retention, &agent, &backup).await;
        }
    }

    /// Applies the bucket's retention to one entry; a failure is logged and tried
    /// again (nothing is lost by keeping too much meanwhile).
    async fn prune(&self, retention: nbackup_protocol::retention::Retention, agent: &Name, backup: &Name) {
        let result = objects::prune(&self.remote, &self.bucket, retention, agent, backup, &self.manifests).await;
        let key = (agent.clone(), backup.clone());
        if result.is_ok() {
            crate::lock(&self.unpruned).remove(&key);
        } else {
            crate::lock(&self.unpruned).insert(key);
        }
        match result {
            Ok(deleted) if !deleted.is_empty() => {
                let who = crate::state::EventSpec {
                    agent: Some(agent.as_str()),
                    backup: Some(backup.as_str()),
                    ..Default::default()
                };
                if let Some(server) = self.server.upgrade() {
                    server.telemetry.events.record(
                        nbackup_protocol::admin::EventKind::Rotated,
                        who,
                        format!("bucket {} keeps {retention}: deleted {}", self.bucket.name, deleted.join(", ")),
                    );
                }
            }
            Ok(_) => {}
            Err(e) => warn!(
                storage = %self.storage, bucket = %self.bucket.name, %agent, %backup,
                "the bucket's retention could not be applied (tried again in {PRUNE_RETRY:?}): {e}"
            ),
        }
    }
}

enum Retry {
    Later(String),
    Never(String),
}

/// The manifest and off-site state of `archive`; `None` if either is gone.
fn read(archive: &Path) -> Result<Option<(Manifest, Copies)>, String> {
    if !archive.exists() {
        return Ok(None);
    }
    let manifest = match std::fs::read_to_string(sidecar_path(archive)) {
        Ok(t) => Manifest::from_json(&t).map_err(|e| format!("manifest: {e}"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("manifest: {e}")),
    };
    match Copies::load(archive) {
        Ok(Some(c)) => Ok(Some((manifest, c))),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Archives of `area` whose copy to `bucket` is owed, oldest queued first.
fn owed(area: &StorageArea, bucket: &str) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    let Ok(entries) = area.entries() else { return Vec::new() };
    for (agent, backup) in entries {
        let Ok(archives) = area.list(&agent, &backup) else { continue };
        for a in archives {
            if let Ok(Some(c)) = Copies::load(&a.path)
                && let Some(copy) = c.buckets.get(bucket)
                && !copy.is_verified()
            {
                found.push((copy.queued_at, a.path));
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{Lag, Stats};
    use nbackup_protocol::Name;
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn a_bucket_is_raised_once_when_it_falls_behind_and_once_when_it_catches_up() {
        let mut st = Stats::default();
        let day = Duration::from_secs(86_400);
        assert_eq!(st.lag(day, 1_000_000), None, "nothing owed");
        st.owed.insert(PathBuf::from("a"), (1_000_000, false));
        st.owed.insert(PathBuf::from("b"), (1_050_000, true));
        assert_eq!(st.lag(day, 1_080_000), None, "under a day");
        assert_eq!(st.lag(day, 1_086_400), Some(Lag::Behind { secs: 86_400, owed: 2 }));
        assert_eq!(st.lag(day, 1_090_000), None, "raised once");
        st.owed.remove(&PathBuf::from("a"));
        assert_eq!(st.lag(day, 1_090_000), Some(Lag::CaughtUp), "the oldest left is under a day old");
        assert_eq!(st.lag(day, 1_090_001), None);
        // A clock stepped back makes nothing look older.
        assert_eq!(st.lag(day, 0), None);
        let shown: Vec<String> = [40, 432, 7500, 273_600].iter().map(|s| super::age(*s)).collect();
        assert_eq!(shown, ["40s", "7m 12s", "2h 5m", "3d 4h"]);
    }

    use nbackup_protocol::config::{Bucket, Provider};

    /// A sync bucket named `offsite` with the smallest parts, one at a time.
    pub fn bucket() -> Bucket {
        Bucket {
            part_size: Bucket::MIN_PART_SIZE,
            concurrency: 1,
            alert_after: None,
            ..Bucket::with_defaults(Name::new("offsite").expect("name"), Provider::S3, "b")
        }
    }
}
