//! Off-site copies: the buckets of a storage (`storages.<name>.buckets[]`).
//!
//! Every archive a storage commits is copied to each of its buckets under one key
//! scheme, `<prefix><agent>/<backup>/<archive>` (and `<archive>.json`, the manifest).
//! Credentials never appear here: they come from the environment or from a file the
//! bucket names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, Source};
use super::resolve;
use super::units::{ByteSize, HumanDuration};
use crate::Name;
pub use crate::retention::Retention;

/// Cloud API a bucket speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Amazon S3 or any S3-compatible server (MinIO, Ceph RGW, Garage, …).
    S3,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::S3 => "s3",
            Provider::Gcs => "gcs",
            Provider::Azure => "azure",
        })
    }
}

/// What a bucket is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketMode {
    /// A copy of every committed archive; local rotation stays as configured (but
    /// never removes an archive before it is verified in the bucket), and nothing is
    /// ever deleted from the bucket.
    Sync,
    /// The bucket is where archives live: once an archive is verified there (and in
    /// every other bucket it owes), only the newest `keep_local` stay on disk. The
    /// bucket keeps what its retention says, by default the storage's `max_backups`.
    Offload { keep_local: u32 },
    /// A long-term copy with a retention of its own, whatever the disk keeps.
    Archive,
}

impl BucketMode {
    pub fn name(&self) -> &'static str {
        match self {
            BucketMode::Sync => "sync",
            BucketMode::Offload { .. } => "offload",
            BucketMode::Archive => "archive",
        }
    }
}

/// One validated bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Unique within its storage; names the bucket in status, metrics and `ctl sync`.
    pub name: Name,
    pub provider: Provider,
    pub bucket: String,
    /// Prepended to every key; empty or ending in `/`.
    pub prefix: String,
    /// An S3-compatible server's URL (path-style requests), or another endpoint.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Where the credentials are (see `docs/offsite.md`); `None`: the environment.
    pub credentials_file: Option<PathBuf>,
    pub mode: BucketMode,
    /// What the bucket keeps of each entry (offload and archive); `None`: everything
    /// (sync — nbackup never deletes from such a bucket).
    pub retention: Option<Retention>,
    /// Objects are locked for this many days once copied (S3 Object Lock, compliance
    /// mode; the bucket must have Object Lock enabled): nobody, nbackup included, can
    /// delete or overwrite them before; retention leaves them until then.
    pub immutable_days: Option<u32>,
    /// Most bytes per second uploads to this bucket send; `None`: unlimited.
    pub bandwidth: Option<u64>,
    /// An upload that moves no byte for this long is abandoned and retried.
    pub stall_timeout: Duration,
    /// A copy owed for longer than this raises `offsite_lagging` (a failure
    /// notification) until the bucket catches up; `None`: never.
    pub alert_after: Option<Duration>,
    /// Bytes per part of a multipart upload.
    pub part_size: u64,
    /// Parts of one upload in flight at once (memory: `part_size × concurrency`).
    pub concurrency: u32,
    /// Plain HTTP to a non-loopback endpoint. Off by default: archives are not
    /// encrypted at rest, and credentials would cross the network in the clear.
    pub allow_http: bool,
}

impl Bucket {
    pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);
    pub const DEFAULT_ALERT_AFTER: Duration = Duration::from_secs(86_400);
    pub const DEFAULT_PART_SIZE: u64 = 16 * ByteSize::MIB;
    pub const DEFAULT_CONCURRENCY: u32 = 4;
    /// S3's limits, which GCS and Azure exceed: 5 MiB to 5 GiB per part, 10 000 parts.
    pub const MIN_PART_SIZE: u64 = 5 * ByteSize::MIB;
    pub const MAX_PART_SIZE: u64 = 5 * ByteSize::GIB;
    pub const MAX_PARTS: u64 = 10_000;

    /// A sync bucket with every setting at its default, as a configuration naming
    /// only these three would give.
    pub fn with_defaults(name: Name, provider: Provider, bucket: impl Into<String>) -> Bucket {
        Bucket {
            name,
            provider,
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            credentials_file: None,
            mode: BucketMode::Sync,
            retention: None,
            immutable_days: None,
            bandwidth: None,
            stall_timeout: Self::DEFAULT_STALL_TIMEOUT,
            alert_after: Some(Self::DEFAULT_ALERT_AFTER),
            part_size: Self::DEFAULT_PART_SIZE,
            concurrency: Self::DEFAULT_CONCURRENCY,
            allow_http: false,
        }
    }

    /// The object key of an archive (or of `<archive>.json`).
    pub fn key(&self, agent: &str, backup: &str, file: &str) -> String {
        format!("{}{agent}/{backup}/{file}", self.prefix)
    }

    /// The part size for an object of `size` bytes: the configured one, doubled until
    /// the object fits in [`Bucket::MAX_PARTS`] parts.
    pub fn part_size_for(&self, size: u64) -> u64 {
        let mut part = self.part_size;
        while size.div_ceil(part) > Self::MAX_PARTS && part < Self::MAX_PART_SIZE {
            part = (part * 2).min(Self::MAX_PART_SIZE);
        }
        part
    }
}

#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    pub name: String,
    pub provider: Provider,
    pub bucket: String,
    pub prefix: Option<String>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub mode: Option<String>,
    pub keep_local: Option<u32>,
    pub retain: Option<u32>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub immutable_days: Option<u32>,
    pub bandwidth: Option<ByteSize>,
    pub stall_timeout: Option<HumanDuration>,
    pub alert_after: Option<HumanDuration>,
    pub part_size: Option<ByteSize>,
    pub concurrency: Option<u32>,
    pub allow_http: Option<bool>,
}

/// Most buckets per storage.
pub const MAX_BUCKETS: usize = 8;

/// Longest object lock: a hundred years.
pub const MAX_IMMUTABLE_DAYS: u32 = 36_500;

pub(super) fn from_raw(
    raw: Vec<RawBucket>,
    at: &str,
    src: &Source<'_>,
    base: &Path,
    max_backups: u32,
) -> Result<Vec<Bucket>, ConfigError> {
    if raw.len() > MAX_BUCKETS {
        return Err(src.error(Some(&format!("{at}.buckets")), format!("more than {MAX_BUCKETS} buckets"), None));
    }
    let mut out: Vec<Bucket> = Vec::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let at = format!("{at}.buckets[{i}]");
        let key = |k: &str| format!("{at}.{k}");
        let err = |k: &str, msg: String, hint: Option<&str>| src.error(Some(&key(k)), msg, hint.map(str::to_string));
        let name = Name::new(b.name.clone())
            .map_err(|e| err("name", format!("invalid bucket name {:?}: {e}", b.name), None))?;
        if out.iter().any(|o| o.name == name) {
            return Err(err(
                "name",
                format!("two buckets of this storage are named {name}"),
                Some("give each its own name"),
            ));
        }
        if b.bucket.is_empty() || b.bucket.contains('/') || b.bucket.chars().any(char::is_whitespace) {
            return Err(err(
                "bucket",
                format!("{:?} is not a bucket name", b.bucket),
                Some("the bucket (or Azure container) alone; put a path into prefix"),
            ));
        }
        let prefix = b.prefix.unwrap_or_default();
        if prefix.starts_with('/')
            || (!prefix.is_empty() && !prefix.ends_with('/'))
            || prefix.split('/').any(|s| s == ".." || s == ".")
        {
            return Err(err(
                "prefix",
                format!("{prefix:?} is not a key prefix"),
                Some("e.g. \"nbackup/\": relative, ending in /"),
            ));
        }
        let allow_http = b.allow_http.unwrap_or(false);
        if let Some(url) = &b.endpoint {
            let (scheme, rest) = url.split_once("://").ok_or_else(|| {
                err(
                    "endpoint",
                    format!("{url:?} is not a URL"),
                    Some("e.g. https://s3.eu-central-1.amazonaws.com or http://127.0.0.1:9000"),
                )
            })?;
            match scheme {
                "https" => {}
                "http" if allow_http || is_loopback(rest) => {}
                "http" => {
                    return Err(err(
                        "endpoint",
                        format!("{url} is plain HTTP to another host"),
                        Some("use https, or set allow_http: true if the network between them is trusted"),
                    ));
                }
                _ => return Err(err("endpoint", format!("{url:?} is not an http(s) URL"), None)),
            }
        }
        let retention = Retention {
            last: b.retain.unwrap_or(0),
            daily: b.keep_daily.unwrap_or(0),
            weekly: b.keep_weekly.unwrap_or(0),
            monthly: b.keep_monthly.unwrap_or(0),
        };
        let has_retention =
            b.retain.is_some() || b.keep_daily.is_some() || b.keep_weekly.is_some() || b.keep_monthly.is_some();
        let first_retention_key = [
            ("retain", b.retain),
            ("keep_daily", b.keep_daily),
            ("keep_weekly", b.keep_weekly),
            ("keep_monthly", b.keep_monthly),
        ]
        .into_iter()
        .find(|(_, v)| v.is_some())
        .map_or("retain", |(k, _)| k);
        let mode_name = b.mode.as_deref().unwrap_or("sync");
        let (mode, retention) = match mode_name {
            "sync" => {
                if has_retention {
                    return Err(err(
                        first_retention_key,
                        "a sync bucket keeps every archive; it has no retention".into(),
                        Some("use mode: archive for a retention of the bucket's own, or offload"),
                    ));
                }
                (BucketMode::Sync, None)
            }
            "offload" => {
                let keep_local = b.keep_local.unwrap_or(1);
                if keep_local > max_backups {
                    return Err(err(
                        "keep_local",
                        format!("keep_local {keep_local} is more than the storage's max_backups {max_backups}"),
                        Some("the disk never keeps more than max_backups"),
                    ));
                }
                let retention =
                    if has_retention { retention } else { Retention { last: max_backups, ..Default::default() } };
                (BucketMode::Offload { keep_local }, Some(retention))
            }
            "archive" => {
                if !has_retention {
                    return Err(err(
                        "mode",
                        "an archive bucket needs a retention of its own".into(),
                        Some("set retain: N (the newest N per entry) and/or keep_daily, keep_weekly, keep_monthly"),
                    ));
                }
                (BucketMode::Archive, Some(retention))
            }
            other => {
                return Err(err("mode", format!("unknown mode {other:?}"), Some("use sync, offload or archive")));
            }
        };
        if b.keep_local.is_some() && !matches!(mode, BucketMode::Offload { .. }) {
            return Err(err(
                "keep_local",
                format!("keep_local is for offload buckets; this one is {mode_name}"),
                Some("local rotation is max_backups"),
            ));
        }
        if retention.is_some_and(|r| r.is_empty()) {
            return Err(err(
                first_retention_key,
                "this retention keeps nothing".into(),
                Some("keep at least one archive per entry"),
            ));
        }
        let immutable_days = match b.immutable_days {
            None | Some(0) => None,
            Some(d) if d > MAX_IMMUTABLE_DAYS => {
                return Err(err("immutable_days", format!("{d} is out of range"), Some("use 1 to 36500")));
            }
            Some(_) if b.provider == Provider::Gcs => {
                return Err(err(
                    "immutable_days",
                    "GCS objects cannot be locked one by one through its XML API".into(),
                    Some(
                        "set a retention policy on the GCS bucket itself (gcloud storage buckets update --retention-period)",
                    ),
                ));
            }
            Some(_) if b.provider == Provider::Azure => {
                return Err(err(
                    "immutable_days",
                    "this version locks S3 objects only".into(),
                    Some("set a time-based immutability policy on the Azure container itself"),
                ));
            }
            Some(d) => Some(d),
        };
        if b.provider != Provider::S3 && b.region.is_some() {
            return Err(err("region", format!("{} buckets have no region setting", b.provider), None));
        }
        let part_size = b.part_size.map_or(Bucket::DEFAULT_PART_SIZE, |p| p.0);
        if !(Bucket::MIN_PART_SIZE..=Bucket::MAX_PART_SIZE).contains(&part_size) {
            return Err(err("part_size", format!("{} is out of range", ByteSize(part_size)), Some("use 5mib to 5gib")));
        }
        let concurrency = b.concurrency.unwrap_or(Bucket::DEFAULT_CONCURRENCY);
        if !(1..=64).contains(&concurrency) {
            return Err(err("concurrency", format!("{concurrency} is out of range"), Some("use 1 to 64")));
        }
        let stall_timeout = b.stall_timeout.map_or(Bucket::DEFAULT_STALL_TIMEOUT, |d| d.0);
        if stall_timeout < Duration::from_secs(1) {
            return Err(err("stall_timeout", "must be at least 1s".into(), None));
        }
        let alert_after = match b.alert_after.map(|d| d.0) {
            None => Some(Bucket::DEFAULT_ALERT_AFTER),
            Some(d) if d.is_zero() => None,
            Some(d) if d < Duration::from_secs(1) => {
                return Err(err("alert_after", "must be at least 1s (or 0s: never)".into(), None));
            }
            Some(d) => Some(d),
        };
        out.push(Bucket {
            name,
            provider: b.provider,
            bucket: b.bucket,
            prefix,
            endpoint: b.endpoint,
            region: b.region,
            credentials_file: b.credentials_file.map(|p| resolve(base, p)),
            mode,
            retention,
            immutable_days,
            bandwidth: b.bandwidth.map(|b| b.0).filter(|b| *b > 0),
            stall_timeout,
            alert_after,
            part_size,
            concurrency,
            allow_http,
        });
    }
    Ok(out)
}

/// `127.0.0.1:9000/…`, `[::1]:…`, `localhost…`.
fn is_loopback(authority_and_path: &str) -> bool {
    let authority = authority_and_path.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    fn buckets(yaml: &str) -> Result<Vec<Bucket>, String> {
        let text = format!(
            "server:\n  listen: \"127.0.0.1:9847\"\ntls:\n  ca_cert: ca.crt\n  server_cert: s.crt\n  server_key: s.key\n\
             storages:\n  main:\n    base_dir: /tmp/x\n    max_backups: 3\n    compression: gzip\n    buckets:\n{yaml}"
        );
        let cfg = ServerConfig::parse(&text, Path::new("/etc/nbackup/server.yaml")).map_err(|e| e.to_string())?;
        Ok(cfg.storages.into_values().next().expect("storage").buckets)
    }

    #[test]
    fn modes_retentions_and_their_mistakes() {
        let b = buckets(
            "      - name: s3\n        provider: s3\n        bucket: fleet\n        prefix: nb/\n        endpoint: http://127.0.0.1:5000\n\
             \x20       credentials_file: s3.env\n        mode: sync\n        bandwidth: 20mb\n",
        )
        .expect("parses");
        assert_eq!((&b[0].mode, b[0].retention, b[0].immutable_days), (&BucketMode::Sync, None, None));
        let off = buckets("      - {name: o, provider: s3, bucket: x, mode: offload}\n").expect("parses");
        assert_eq!(off[0].mode, BucketMode::Offload { keep_local: 1 });
        assert_eq!(off[0].retention, Some(Retention { last: 3, ..Default::default() }), "max_backups by default");
        let arch = buckets(
            "      - {name: a, provider: s3, bucket: x, mode: archive, keep_daily: 7, keep_monthly: 12, immutable_days: 30}\n",
        )
        .expect("parses");
        assert_eq!(arch[0].retention, Some(Retention { daily: 7, monthly: 12, ..Default::default() }));
        assert_eq!((&arch[0].mode, arch[0].immutable_days), (&BucketMode::Archive, Some(30)));
        assert_eq!(b[0].credentials_file.as_deref(), Some(Path::new("/etc/nbackup/s3.env")));
        assert_eq!((b[0].bandwidth, b[0].part_size, b[0].concurrency), (Some(20 << 20), 16 << 20, 4));
        assert_eq!(b[0].key("a", "b", "c.tar.gz"), "nb/a/b/c.tar.gz");
        let gcs = buckets("      - {name: cold, provider: gcs, bucket: x, credentials_file: /etc/nbackup/sa.json}\n")
            .expect("parses");
        assert_eq!((gcs[0].provider, gcs[0].prefix.as_str()), (Provider::Gcs, ""));
        let cases = [
            ("      - {name: a, provider: s3, bucket: x, endpoint: \"http://10.0.0.9:9000\"}\n", "plain HTTP"),
            ("      - {name: a, provider: s3, bucket: x, keep_local: 2}\n", "for offload"),
            ("      - {name: a, provider: s3, bucket: x, keep_hourly: 2}\n", "unknown key"),
            ("      - {name: a, provider: s3, bucket: \"x/y\"}\n", "not a bucket name"),
            ("      - {name: a, provider: s3, bucket: x, prefix: \"../\"}\n", "not a key prefix"),
            ("      - {name: a, provider: s3, bucket: x, prefix: nb}\n", "not a key prefix"),
            ("      - {name: a, provider: s3, bucket: x, part_size: 1mb}\n", "out of range"),
            ("      - {name: a, provider: s3, bucket: x, alert_after: 500ms}\n", "at least 1s"),
            ("      - {name: a, provider: gcs, bucket: x, region: eu}\n", "no region"),
            ("      - {name: a, provider: s3, bucket: x}\n      - {name: a, provider: s3, bucket: y}\n", "two buckets"),
            ("      - {name: a, provider: s3, bucket: x, mode: mirror}\n", "unknown mode"),
            ("      - {name: a, provider: s3, bucket: x, mode: archive}\n", "needs a retention"),
            ("      - {name: a, provider: s3, bucket: x, retain: 3}\n", "has no retention"),
            ("      - {name: a, provider: s3, bucket: x, mode: archive, keep_daily: 0}\n", "keeps nothing"),
            ("      - {name: a, provider: s3, bucket: x, mode: offload, keep_local: 4}\n", "more than the storage's"),
            ("      - {name: a, provider: s3, bucket: x, mode: archive, retain: 2, keep_local: 1}\n", "for offload"),
            ("      - {name: a, provider: gcs, bucket: x, immutable_days: 30}\n", "retention policy"),
            ("      - {name: a, provider: azure, bucket: x, immutable_days: 30}\n", "immutability policy"),
            ("      - {name: a, provider: s3, bucket: x, immutable_days: 40000}\n", "out of range"),
            ("      - {name: a, provider: s3, bucket: x, secret_key: hunter2}\n", "unknown key"),
        ];
        for (yaml, want) in cases {
            let err = buckets(yaml).expect_err(yaml);
            assert!(err.contains(want), "{yaml}: {err}");
        }
    }

    #[test]
    fn loopback_hosts_are_recognised() {
        for yes in ["127.0.0.1:9000", "127.0.0.1:9000/x", "localhost:5000", "[::1]:80/", "localhost"] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in ["10.0.0.1:9000", "s3.example.com", "127.0.0.1.example.com:80", "[2001:db8::1]:80"] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn part_size_grows_until_the_object_fits_in_ten_thousand_parts() {
        let b = Bucket::with_defaults(Name::new("b").expect("name"), Provider::S3, "x");
        let parsed = buckets("      - {name: b, provider: s3, bucket: x}\n").expect("parses");
        assert_eq!(parsed, std::slice::from_ref(&b), "the defaults are what the parser gives");
        assert_eq!(b.part_size_for(1 << 30), 16 << 20);
        // 456 GB, the reference system's failure: 16 MiB parts would need 27 180.
        let big = 456_000_000_000;
        let part = b.part_size_for(big);
        assert_eq!(part, 64 << 20);
        assert!(big.div_ceil(part) <= Bucket::MAX_PARTS);
        assert_eq!(b.part_size_for(u64::MAX), Bucket::MAX_PART_SIZE);
        assert_eq!(
            b.key("web-01", "etc", "web-01-etc-20261201T000000Z.tar.zst"),
            "web-01/etc/web-01-etc-20261201T000000Z.tar.zst"
        );
    }
}
