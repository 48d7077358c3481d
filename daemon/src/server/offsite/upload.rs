//! One archive to one bucket: a multipart upload streamed from the file, resumed from
//! the last acknowledged part, then verified against the manifest.
//!
//! Memory is bounded by `part_size × concurrency`, whatever the archive's size; the
//! part size doubles for archives that would need more than 10 000 parts. Each part's
//! MD5 is compared with the entity tag the provider returns for it, and the finished
//! object's size, composite entity tag and our SHA-256 (object metadata) with the
//! manifest. Nothing is counted as copied before all of that holds.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use md5::Digest;
use object_store::multipart::PartId;
use object_store::path::Path as Key;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, ObjectStoreExt, PutMultipartOptions, PutPayload,
};

use nbackup_protocol::config::Bucket;
use nbackup_protocol::manifest::Manifest;

use super::client::Remote;
use super::state::{Copy, CopyState, Multipart, composite_e_tag};

/// Object metadata holding the archive's SHA-256 (hex), as the manifest has it.
pub const SHA256_META: &str = "nbackup-sha256";
/// Object metadata holding the archive's commit sequence.
pub const SEQ_META: &str = "nbackup-commit-seq";

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("no byte moved for {0:?} (stall_timeout)")]
    Stalled(Duration),
    #[error("{0}")]
    Store(#[from] object_store::Error),
    #[error("reading the archive: {0}")]
    Io(#[from] io::Error),
    /// What arrived is not what was sent: the upload starts over.
    #[error("verification failed: {0}")]
    Mismatch(String),
    #[error("object lock: {0}")]
    Lock(#[from] super::lock::LockError),
}

impl UploadError {
    /// Whether the upload in progress must be abandoned (aborted and started over)
    /// rather than resumed.
    pub fn restarts(&self) -> bool {
        matches!(self, UploadError::Mismatch(_) | UploadError::Store(object_store::Error::NotFound { .. }))
    }
}

/// One archive for one bucket.
pub struct Job<'a> {
    pub remote: &'a Remote,
    pub bucket: &'a Bucket,
    pub archive: &'a Path,
    pub manifest: &'a Manifest,
    /// The object's key.
    pub key: &'a str,
    /// Whether the server is receiving a backup now: the upload then keeps one part
    /// in flight (see `background`).
    pub ingesting: &'a (dyn Fn() -> bool + Send + Sync),
}

/// Where an upload records its progress: `copy` is updated as parts are acknowledged
/// and handed to `save` each time, so that a crash resumes from there. It writes a
/// file durably, so it runs off the async threads.
pub type Save<'a> = &'a (dyn Fn(Copy) -> futures_util::future::BoxFuture<'static, io::Result<()>> + Send + Sync);

/// Uploads the job's archive and verifies it; the object's entity tag.
/// A finished copy: the object's entity tag, and whether the object was already in
/// the bucket (same size and SHA-256: found, not uploaded again).
pub struct Sent {
    pub e_tag: Option<String>,
    pub already_there: bool,
    /// When the objects' lock ends (unix seconds), with `immutable_days`.
    pub locked_until: Option<u64>,
}

pub async fn upload(job: &Job<'_>, copy: &mut Copy, save: Save<'_>) -> Result<Sent, UploadError> {
    job.remote.meter.touch();
    watched(job.remote, job.bucket.stall_timeout, transfer(job, copy, save)).await?
}

/// Runs `fut` until it ends or nothing has moved for `timeout`.
async fn watched<T>(remote: &Remote, timeout: Duration, fut: impl Future<Output = T>) -> Result<T, UploadError> {
    tokio::pin!(fut);
    let mut tick = tokio::time::interval((timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1)));
    loop {
        tokio::select! {
            out = &mut fut => return Ok(out),
            _ = tick.tick() => {
                let idle = remote.meter.idle();
                if idle >= timeout {
                    return Err(UploadError::Stalled(idle));
                }
            }
        }
    }
}

async fn transfer(job: &Job<'_>, copy: &mut Copy, save: Save<'_>) -> Result<Sent, UploadError> {
    let Job { remote, bucket, archive, manifest, key, ingesting } = *job;
    let file = Arc::new(File::open(archive)?);
    let size = file.metadata()?.len();
    if size != manifest.size {
        return Err(UploadError::Mismatch(format!(
            "the local archive has {size} bytes, its manifest {}",
            manifest.size
        )));
    }
    let location = Key::from(key);
    let fresh = match &copy.upload {
        Some(m) => m.key != key,
        None => true,
    };
    if fresh && let Some(e_tag) = already_there(remote, &location, manifest).await? {
        put_manifest(remote, key, manifest).await?;
        let catalog = put_catalog(remote, bucket, archive, key).await?;
        let locked_until = hold(remote, bucket, key, catalog).await?;
        return Ok(Sent { e_tag, already_there: true, locked_until });
    }
    if fresh {
        let part_size = bucket.part_size_for(size);
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::Metadata(SHA256_META.into()), AttributeValue::from(manifest.sha256.clone()));
        if let Some(seq) = manifest.commit_seq {
            attributes.insert(Attribute::Metadata(SEQ_META.into()), AttributeValue::from(seq.to_string()));
        }
        let content_type = match manifest.compression {
            nbackup_protocol::wire::Compression::Gzip => "application/gzip",
            nbackup_protocol::wire::Compression::Zstd => "application/zstd",
        };
        attributes.insert(Attribute::ContentType, AttributeValue::from(content_type));
        let id = if carries_metadata(bucket) {
            let opts = PutMultipartOptions { attributes, ..Default::default() };
            remote.multipart.create_multipart_opts(&location, opts).await?
        } else {
            remote.multipart.create_multipart(&location).await?
        };
        copy.upload = Some(Multipart { key: key.to_string(), id, part_size, parts: Vec::new(), md5: Vec::new() });
    }
    copy.state = CopyState::Uploading;
    save(copy.clone()).await?;
    let m = copy.upload.clone().expect("set above");
    let total = size.div_ceil(m.part_size).max(1);
    let mut next = m.parts.len() as u64;
    let buffers = Buffers::default();
    let parts = Parts { remote, location: &location, m: &m, buffers: &buffers, check_md5: carries_metadata(bucket) };
    let mut in_flight = FuturesOrdered::new();
    loop {
        let limit = if ingesting() { 1 } else { bucket.concurrency as usize };
        while next < total && in_flight.len() < limit {
            in_flight.push_back(send_part(&parts, file.clone(), next, size));
            next += 1;
        }
        let Some(done) = in_flight.next().await else { break };
        let (etag, md5) = done?;
        let up = copy.upload.as_mut().expect("set above");
        up.parts.push(etag);
        up.md5.push(md5);
        save(copy.clone()).await?;
    }
    let up = copy.upload.clone().expect("set above");
    let parts = up.parts.iter().map(|p| PartId { content_id: p.clone() }).collect();
    remote.multipart.complete_multipart(&location, &up.id, parts).await?;
    put_manifest(remote, key, manifest).await?;
    let catalog = put_catalog(remote, bucket, archive, key).await?;
    let e_tag = verify(remote, &location, manifest, &up, carries_metadata(bucket)).await?;
    let locked_until = hold(remote, bucket, key, catalog).await?;
    Ok(Sent { e_tag, already_there: false, locked_until })
}

/// Locks the archive, its manifest and catalog for `immutable_days` (from now), and
/// checks the locks hold; the time they end (unix seconds).
async fn hold(remote: &Remote, bucket: &Bucket, key: &str, catalog: bool) -> Result<Option<u64>, UploadError> {
    let (Some(days), Some(locker)) = (bucket.immutable_days, &remote.lock) else { return Ok(None) };
    let until = chrono::Utc::now() + chrono::Duration::days(i64::from(days));
    let mut keys = vec![key.to_string(), format!("{key}.json")];
    if catalog {
        keys.push(format!("{key}.catalog"));
    }
    for k in keys {
        locker.hold(&k, until).await?;
    }
    Ok(Some(until.timestamp().max(0) as u64))
}

/// Whether this provider's multipart uploads are S3-like: they carry our metadata and
/// answer each part with its MD5. Azure is not: `object_store` cannot set metadata on
/// a block blob's block list, and a block's id is ours, not a checksum — there the
/// SHA-256 travels only in `<key>.json` and the object is checked by its size.
fn carries_metadata(bucket: &Bucket) -> bool {
    bucket.provider != nbackup_protocol::config::Provider::Azure
}

/// `<key>.json`: the manifest beside the object.
async fn put_manifest(remote: &Remote, key: &str, manifest: &Manifest) -> Result<(), UploadError> {
    let sidecar = Key::from(format!("{key}.json"));
    let json = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
    remote.store.put(&sidecar, PutPayload::from(json)).await?;
    Ok(())
}

/// `<key>.catalog`, the archive's member list, when it has one (so `nbackup ls` and
/// a selective restore work from the bucket too); streamed in parts when it is
/// larger than one.
async fn put_catalog(remote: &Remote, bucket: &Bucket, archive: &Path, key: &str) -> Result<bool, UploadError> {
    use tokio::io::AsyncReadExt;
    let mut file = match tokio::fs::File::open(crate::server::storage::catalog_path(archive)).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let location = Key::from(format!("{key}.catalog"));
    let len = file.metadata().await?.len();
    if len <= bucket.part_size {
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf).await?;
        remote.store.put(&location, PutPayload::from(buf)).await?;
        return Ok(true);
    }
    let upload = remote.store.put_multipart(&location).await?;
    let mut parts = object_store::WriteMultipart::new_with_chunk_size(upload, bucket.part_size as usize);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let _ = parts.abort().await;
                return Err(e.into());
            }
        };
        if n == 0 {
            break;
        }
        if let Err(e) = parts.wait_for_capacity(bucket.concurrency as usize).await {
            let _ = parts.abort().await;
            return Err(e.into());
        }
        parts.write(&buf[..n]);
    }
    parts.finish().await?;
    Ok(true)
}

/// Whether the bucket already holds this archive under `location` — its size and our
/// SHA-256 metadata match the manifest (a copy made before the sidecar knew, or by
/// an earlier server): the entity tag if so.
async fn already_there(
    remote: &Remote,
    location: &Key,
    manifest: &Manifest,
) -> Result<Option<Option<String>>, UploadError> {
    let head = match remote.store.get_opts(location, GetOptions { head: true, ..Default::default() }).await {
        Ok(h) => h,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let sha = head.attributes.get(&Attribute::Metadata(SHA256_META.into())).map(|v| v.as_ref().to_string());
    let same = head.meta.size == manifest.size && sha.as_deref() == Some(manifest.sha256.as_str());
    Ok(same.then_some(head.meta.e_tag))
}

/// Reads part `index` from the file and sends it; returns the provider's id of the
/// part and its MD5 (hex), refusing a part whose entity tag is another MD5.
/// Where the parts of one upload go, and whether their ids are MD5s to check.
struct Parts<'a> {
    remote: &'a Remote,
    location: &'a Key,
    m: &'a Multipart,
    buffers: &'a Buffers,
    check_md5: bool,
}

async fn send_part(to: &Parts<'_>, file: Arc<File>, index: u64, size: u64) -> Result<(String, String), UploadError> {
    let Parts { remote, location, m, buffers, check_md5 } = *to;
    let offset = index * m.part_size;
    let len = m.part_size.min(size - offset) as usize;
    let mut buf = buffers.take();
    let (data, md5) = super::background::run(move || -> io::Result<(Bytes, String)> {
        buf.resize(len, 0);
        file.read_exact_at(&mut buf, offset)?;
        let md5 = nbackup_protocol::manifest::hex(&md5::Md5::digest(&buf));
        Ok((buf.freeze(), md5))
    })
    .await??;
    let kept = data.clone();
    let part = remote.multipart.put_part(location, &m.id, index as usize, PutPayload::from(data)).await;
    buffers.give(kept);
    let part = part?;
    if check_md5
        && let Some(theirs) = md5_of_tag(&part.content_id)
        && theirs != md5
    {
        return Err(UploadError::Mismatch(format!("part {index} arrived with MD5 {theirs}, sent {md5}")));
    }
    Ok((part.content_id, md5))
}

/// Part buffers, reused once the HTTP client has let go of them: `part_size ×
/// concurrency` is then what an upload holds. Fresh buffers per part left it to the
/// allocator, whose per-thread arenas kept freed ones: 166–179 MiB of server RSS for
/// 64–128 MiB of parts in flight.
#[derive(Default)]
struct Buffers(std::sync::Mutex<Vec<bytes::BytesMut>>);

impl Buffers {
    fn take(&self) -> bytes::BytesMut {
        crate::lock(&self.0).pop().map_or_else(bytes::BytesMut::new, |mut b| {
            b.clear();
            b
        })
    }

    /// Takes the buffer back if nothing else holds it any more.
    fn give(&self, data: Bytes) {
        if let Ok(b) = data.try_into_mut() {
            crate::lock(&self.0).push(b);
        }
    }
}

/// The MD5 an entity tag is, when it is one (S3 and GCS parts; not Azure blocks, not
/// S3 with SSE-KMS).
fn md5_of_tag(tag: &str) -> Option<String> {
    // With checksums on (locked buckets) object_store's part id is a small XML
    // document holding the entity tag.
    let tag = match tag.split_once("<e_tag>").and_then(|(_, rest)| rest.split_once("</e_tag>")) {
        Some((inner, _)) => inner.trim_matches('"').trim_start_matches("&quot;").trim_end_matches("&quot;"),
        None => tag,
    };
    let t = tag.trim_matches('"').to_ascii_lowercase();
    (t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit())).then_some(t)
}

async fn verify(
    remote: &Remote,
    location: &Key,
    manifest: &Manifest,
    up: &Multipart,
    with_metadata: bool,
) -> Result<Option<String>, UploadError> {
    let head = remote.store.get_opts(location, GetOptions { head: true, ..Default::default() }).await?;
    if head.meta.size != manifest.size {
        return Err(UploadError::Mismatch(format!(
            "the object has {} bytes, the archive {}",
            head.meta.size, manifest.size
        )));
    }
    let sha = head.attributes.get(&Attribute::Metadata(SHA256_META.into())).map(|v| v.as_ref().to_string());
    if with_metadata && sha.as_deref() != Some(manifest.sha256.as_str()) {
        return Err(UploadError::Mismatch(format!(
            "the object's sha256 metadata is {sha:?}, the manifest's {}",
            manifest.sha256
        )));
    }
    let e_tag = head.meta.e_tag.clone();
    let comparable = with_metadata && up.parts.iter().all(|p| md5_of_tag(p).is_some());
    if comparable
        && let (Some(theirs), Some(ours)) = (e_tag.as_deref(), composite_e_tag(&up.md5))
        && theirs.trim_matches('"') != ours
    {
        return Err(UploadError::Mismatch(format!("the object's entity tag is {theirs}, its parts make {ours}")));
    }
    Ok(e_tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A provider that counts the parts being put at once.
    #[derive(Debug, Default)]
    struct Counting {
        inner: Arc<object_store::memory::InMemory>,
        now: AtomicUsize,
        most: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl object_store::multipart::MultipartStore for Counting {
        async fn create_multipart(&self, path: &Key) -> object_store::Result<object_store::MultipartId> {
            self.inner.create_multipart(path).await
        }

        async fn create_multipart_opts(
            &self,
            path: &Key,
            opts: PutMultipartOptions,
        ) -> object_store::Result<object_store::MultipartId> {
            self.inner.create_multipart_opts(path, opts).await
        }

        async fn put_part(
            &self,
            path: &Key,
            id: &object_store::MultipartId,
            part_idx: usize,
            data: PutPayload,
        ) -> object_store::Result<PartId> {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            // Long enough for the uploader to start every part it is allowed to.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let done = self.inner.put_part(path, id, part_idx, data).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            done
        }

        async fn complete_multipart(
            &self,
            path: &Key,
            id: &object_store::MultipartId,
            parts: Vec<PartId>,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.complete_multipart(path, id, parts).await
        }

        async fn abort_multipart(&self, path: &Key, id: &object_store::MultipartId) -> object_store::Result<()> {
            self.inner.abort_multipart(path, id).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_the_server_receives_a_backup_an_upload_keeps_one_part_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("a-b-20261202T000000Z.tar.gz");
        let body: Vec<u8> = (0..(26u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&archive, &body).expect("write");
        let mut manifest = crate::server::storage::tests::manifest();
        manifest.archive = "a-b-20261202T000000Z.tar.gz".into();
        manifest.size = body.len() as u64;
        manifest.sha256 = nbackup_protocol::manifest::hex(&sha2::Sha256::digest(&body));
        let mut bucket = crate::server::offsite::tests::bucket();
        bucket.concurrency = 4;
        for (ingesting, most) in [(true, 1), (false, 4)] {
            let counting = Arc::new(Counting::default());
            let remote = Remote {
                store: counting.inner.clone(),
                multipart: counting.clone(),
                meter: Arc::new(super::super::client::Meter::new(None)),
                lock: None,
            };
            let busy = move || ingesting;
            let key = format!("{ingesting}/a/b/{}", manifest.archive);
            let job = Job {
                remote: &remote,
                bucket: &bucket,
                archive: &archive,
                manifest: &manifest,
                key: &key,
                ingesting: &busy,
            };
            let mut copy = Copy::queued(0);
            let save =
                |_c: Copy| -> futures_util::future::BoxFuture<'static, io::Result<()>> { Box::pin(async { Ok(()) }) };
            upload(&job, &mut copy, &save).await.expect("uploaded and verified");
            assert_eq!(copy.upload.as_ref().map(|m| m.parts.len()), Some(6), "six parts of 5 MiB");
            assert_eq!(counting.most.load(Ordering::SeqCst), most, "ingesting: {ingesting}");
        }
    }

    #[test]
    fn only_md5_shaped_tags_are_compared() {
        assert_eq!(
            md5_of_tag("\"9E107D9D372BB6826BD81D3542A419D6\"").as_deref(),
            Some("9e107d9d372bb6826bd81d3542a419d6")
        );
        assert_eq!(md5_of_tag("MDAwMDAwMDA="), None, "an Azure block id");
        assert_eq!(md5_of_tag("\"abc-3\""), None);
        assert_eq!(
            md5_of_tag(
                "<PartMetadata><e_tag>&quot;9e107d9d372bb6826bd81d3542a419d6&quot;</e_tag>\
                 <checksum_sha256>x</checksum_sha256></PartMetadata>"
            )
            .as_deref(),
            Some("9e107d9d372bb6826bd81d3542a419d6"),
            "a part id with its checksum"
        );
    }
}
