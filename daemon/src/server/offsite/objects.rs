//! One entry's objects in a bucket: what is there, what its manifests say, what the
//! bucket's retention lets go, and reading one back for a restore.
//!
//! Only keys the server builds are ever touched: `<prefix><agent>/<backup>/` is
//! listed, and of what comes back only names that parse as that entry's archives
//! (`<agent>-<backup>-<stamp>[-n].tar.{gz,zst}`, and their `.json` and `.catalog`)
//! are read or deleted, so two agents sharing a bucket and prefix, or anything else
//! stored there, are never touched.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use tracing::{info, warn};

use nbackup_protocol::Name;
use nbackup_protocol::config::Bucket;
use nbackup_protocol::manifest::Manifest;
use nbackup_protocol::retention::{Candidate, Retention};
use nbackup_protocol::wire::Compression;

use super::client::Remote;
use crate::server::storage::parse_archive_name;

/// An archive object of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    pub backup: Name,
    pub name: String,
    pub key: String,
    pub size: u64,
    pub modified: DateTime<Utc>,
    pub stamp: String,
    pub n: u32,
    pub compression: Compression,
    /// Size of `<key>.catalog`, if the bucket has it.
    pub catalog: Option<u64>,
}

/// What one listing found: the archives, oldest name first, and the `.json` and
/// `.catalog` objects whose archive is not there (left by an interrupted prune).
#[derive(Debug, Default)]
pub struct Listing {
    pub archives: Vec<Stored>,
    pub orphans: Vec<(String, DateTime<Utc>)>,
}

/// Lists an agent's archives in `bucket`: one entry's when `backup` is named, else
/// every entry's.
pub async fn list(
    remote: &Remote,
    bucket: &Bucket,
    agent: &Name,
    backup: Option<&Name>,
) -> Result<Listing, object_store::Error> {
    let base = match backup {
        Some(b) => format!("{}{agent}/{b}/", bucket.prefix),
        None => format!("{}{agent}/", bucket.prefix),
    };
    let prefix = Key::from(base.trim_end_matches('/'));
    let agent_dir = format!("{}{agent}/", bucket.prefix);
    let mut archives: BTreeMap<String, Stored> = BTreeMap::new();
    let mut sidecars: Vec<(String, String, u64, DateTime<Utc>, bool)> = Vec::new();
    let mut objects = remote.store.list(Some(&prefix));
    while let Some(meta) = objects.next().await {
        let meta = meta?;
        let key = meta.location.to_string();
        let Some(rest) = key.strip_prefix(&agent_dir) else { continue };
        let Some((dir, file)) = rest.split_once('/') else { continue };
        let Ok(entry) = Name::new(dir) else { continue };
        let entry_prefix = format!("{agent}-{entry}-");
        if let Some((stamp, n, compression)) = parse_archive_name(file, &entry_prefix) {
            archives.insert(
                key.clone(),
                Stored {
                    backup: entry,
                    name: file.to_string(),
                    key,
                    size: meta.size,
                    modified: meta.last_modified,
                    stamp,
                    n,
                    compression,
                    catalog: None,
                },
            );
            continue;
        }
        for (suffix, is_catalog) in [(".json", false), (".catalog", true)] {
            if let Some(archive) = file.strip_suffix(suffix)
                && parse_archive_name(archive, &entry_prefix).is_some()
            {
                let archive_key = format!("{agent_dir}{entry}/{archive}");
                sidecars.push((key.clone(), archive_key, meta.size, meta.last_modified, is_catalog));
            }
        }
    }
    let mut orphans = Vec::new();
    for (key, archive_key, size, modified, is_catalog) in sidecars {
        match archives.get_mut(&archive_key) {
            Some(a) if is_catalog => a.catalog = Some(size),
            Some(_) => {}
            None => orphans.push((key, modified)),
        }
    }
    let mut archives: Vec<Stored> = archives.into_values().collect();
    archives.sort_by(|a, b| (&a.backup, &a.stamp, a.n).cmp(&(&b.backup, &b.stamp, b.n)));
    Ok(Listing { archives, orphans })
}

/// `<key>.json`, the manifest put beside an archive; `None` if it is not there or
/// not a manifest.
pub async fn manifest(remote: &Remote, key: &str) -> Result<Option<Manifest>, object_store::Error> {
    let got = match remote.store.get(&Key::from(format!("{key}.json"))).await {
        Ok(g) => g,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let bytes = got.bytes().await?;
    Ok(std::str::from_utf8(&bytes).ok().and_then(|t| Manifest::from_json(t).ok()))
}

/// Manifests already read, by key: they never change once put.
#[derive(Default)]
pub struct Manifests(Mutex<HashMap<String, Option<Arc<Manifest>>>>);

impl Manifests {
    pub async fn get(&self, remote: &Remote, key: &str) -> Result<Option<Arc<Manifest>>, object_store::Error> {
        if let Some(m) = crate::lock(&self.0).get(key) {
            return Ok(m.clone());
        }
        let m = manifest(remote, key).await?.map(Arc::new);
        crate::lock(&self.0).insert(key.to_string(), m.clone());
        Ok(m)
    }

    fn forget(&self, key: &str) {
        crate::lock(&self.0).remove(key);
    }
}

/// An archive only a bucket holds, with the manifest beside it there.
pub struct Elsewhere {
    pub bucket: Name,
    pub stored: Stored,
    pub manifest: Option<Manifest>,
}

/// The agent's archives (one entry's, or all) that the storage's buckets hold and
/// `known` (entry, name) does not — what the disk no longer has — each once, from
/// the first bucket that has it, with its manifest (read a few at a time: one round
/// trip each). A bucket that cannot be listed is logged and left out.
pub async fn elsewhere(
    buckets: &[Bucket],
    agent: &Name,
    backup: Option<&Name>,
    mut known: std::collections::BTreeSet<(Name, String)>,
) -> Vec<Elsewhere> {
    let mut out = Vec::new();
    for bucket in buckets {
        let listed = match super::client::connect(bucket) {
            Ok(remote) => list(&remote, bucket, agent, backup).await.map(|l| (remote, l)).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let (remote, listing) = match listed {
            Ok(v) => v,
            Err(e) => {
                warn!(bucket = %bucket.name, %agent, "cannot list the bucket: {e}");
                continue;
            }
        };
        let only_here: Vec<Stored> =
            listing.archives.into_iter().filter(|o| known.insert((o.backup.clone(), o.name.clone()))).collect();
        let remote = &remote;
        let found: Vec<Elsewhere> = futures_util::stream::iter(only_here)
            .map(|stored| async move {
                let manifest = manifest(remote, &stored.key).await.unwrap_or_else(|e| {
                    warn!(bucket = %bucket.name, key = %stored.key, "cannot read the manifest beside an archive: {e}");
                    None
                });
                Elsewhere { bucket: bucket.name.clone(), stored, manifest }
            })
            .buffered(8)
            .collect()
            .await;
        out.extend(found);
    }
    out
}

/// `yyyymmddThhmmssZ` as a time.
fn stamp_time(stamp: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").ok().map(|t| t.and_utc())
}

/// An archive as retention sees it: its commit order (archives without a number
/// oldest, like the disk's rotation) and when it finished (its manifest's time, else
/// its name's, else `fallback`).
pub fn candidate(stamp: &str, n: u32, fallback: DateTime<Utc>, m: Option<&Manifest>) -> Candidate {
    let named = stamp_time(stamp).unwrap_or(fallback);
    let finished =
        m.and_then(|m| DateTime::parse_from_rfc3339(&m.finished_at).ok()).map_or(named, |t| t.with_timezone(&Utc));
    let seq = m.and_then(|m| m.commit_seq).map_or(0, |s| s.saturating_add(1));
    Candidate { order: (seq, named.timestamp(), n), finished }
}

/// Whether an object written at `modified` is still under the bucket's lock.
fn locked(bucket: &Bucket, modified: DateTime<Utc>, now: DateTime<Utc>) -> bool {
    bucket.immutable_days.is_some_and(|d| modified + chrono::Duration::days(i64::from(d)) > now)
}

/// Deletes what `retention` does not keep of one entry in the bucket: each archive
/// object first, then its manifest and catalog (an interruption leaves sidecars,
/// which the next prune removes, never an archive without its manifest that a
/// listing would show). Objects still locked stay until their lock ends. Returns
/// the archive names deleted.
pub async fn prune(
    remote: &Remote,
    bucket: &Bucket,
    retention: Retention,
    agent: &Name,
    backup: &Name,
    manifests: &Manifests,
) -> Result<Vec<String>, object_store::Error> {
    let listing = list(remote, bucket, agent, Some(backup)).await?;
    let mut candidates = Vec::with_capacity(listing.archives.len());
    for a in &listing.archives {
        let m = manifests.get(remote, &a.key).await?;
        candidates.push(candidate(&a.stamp, a.n, a.modified, m.as_deref()));
    }
    let keep = retention.keep(&candidates);
    let now = Utc::now();
    let mut deleted = Vec::new();
    for (i, a) in listing.archives.iter().enumerate() {
        if keep.contains(&i) {
            continue;
        }
        if locked(bucket, a.modified, now) {
            info!(bucket = %bucket.name, key = %a.key, "past the bucket's retention but still locked; kept until its lock ends");
            continue;
        }
        remote.store.delete(&Key::from(a.key.as_str())).await?;
        for sidecar in [format!("{}.json", a.key), format!("{}.catalog", a.key)] {
            match remote.store.delete(&Key::from(sidecar)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        manifests.forget(&a.key);
        info!(bucket = %bucket.name, key = %a.key, %retention, "deleted from the bucket by its retention");
        deleted.push(a.name.clone());
    }
    for (key, modified) in listing.orphans {
        if !locked(bucket, modified, now) {
            match remote.store.delete(&Key::from(key.as_str())).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => warn!(bucket = %bucket.name, %key, "cannot remove a manifest whose archive is gone: {e}"),
            }
        }
    }
    Ok(deleted)
}

/// The size of object `key` and a stream of its bytes `from..to` (clamped to the
/// size); `size` when the caller already knows it (else it is asked for).
pub async fn read(
    remote: &Remote,
    key: &str,
    size: Option<u64>,
    from: u64,
    to: u64,
) -> Result<(u64, BoxStream<'static, Result<Bytes, object_store::Error>>), object_store::Error> {
    let location = Key::from(key);
    let size = match size {
        Some(s) => s,
        None => remote.store.head(&location).await?.size,
    };
    let to = to.min(size);
    if from >= to {
        return Ok((size, futures_util::stream::empty().boxed()));
    }
    let options = GetOptions { range: Some(GetRange::Bounded(from..to)), ..Default::default() };
    let got = remote.store.get_opts(&location, options).await?;
    Ok((size, got.into_stream()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_read_as_utc_and_locks_end() {
        let t = stamp_time("20261201T020304Z").expect("a stamp");
        assert_eq!(t.to_rfc3339(), "2026-12-01T02:03:04+00:00");
        assert_eq!(stamp_time("2026-12-01"), None);
        let mut b = crate::server::offsite::tests::bucket();
        assert!(!locked(&b, t, t), "no lock configured");
        b.immutable_days = Some(30);
        assert!(locked(&b, t, t + chrono::Duration::days(29)));
        assert!(!locked(&b, t, t + chrono::Duration::days(30)));
    }
}
