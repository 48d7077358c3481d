//! A bucket's client: `object_store` for the provider's API, over an HTTP layer of
//! our own that meters every request body.
//!
//! The meter is what makes the bandwidth limit and the stall detector possible:
//! `object_store` hands a whole part to the HTTP client, so nothing above it sees
//! bytes move. Here each body is sent in [`SLICE`]s; each slice first takes tokens
//! from the bucket's [`Throttle`], then marks progress. An upload is stalled when no
//! slice has gone out (and no response byte come in) for `stall_timeout`, time spent
//! waiting for our own throttle not counted.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};
use object_store::multipart::MultipartStore;
use object_store::{ClientOptions, ObjectStore};

use nbackup_protocol::config::{Bandwidth, Bucket, Provider};

use crate::throttle::{SLICE, Throttle};

/// A bucket's store, in the two views the replicator uses.
pub struct Remote {
    pub store: Arc<dyn ObjectStore>,
    pub multipart: Arc<dyn MultipartStore>,
    pub meter: Arc<Meter>,
    /// Sets and checks each object's lock (`immutable_days`, S3 only).
    pub lock: Option<super::lock::Locker>,
}

/// Progress and pace of everything sent to one bucket.
pub struct Meter {
    throttle: Throttle,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last byte moved.
    last: AtomicU64,
    /// Requests now waiting for the throttle (their silence is ours, not the peer's).
    throttled: AtomicUsize,
    sent: AtomicU64,
}

impl Meter {
    pub(crate) fn new(bandwidth: Option<u64>) -> Self {
        Meter {
            throttle: Throttle::new(Bandwidth { default: bandwidth, windows: Vec::new() }),
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            throttled: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
        }
    }

    pub fn touch(&self) {
        self.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long nothing has moved; zero while a request waits for the throttle.
    pub fn idle(&self) -> Duration {
        if self.throttled.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    /// Request body bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    async fn pace(&self, bytes: usize) {
        if self.throttle.is_unlimited() {
            return;
        }
        self.throttled.fetch_add(1, Ordering::Relaxed);
        self.throttle.acquire(bytes).await;
        self.touch();
        self.throttled.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a bucket's client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read credentials file {path}: {source}")]
    CredentialsFile { path: String, source: io::Error },
    #[error("credentials file {path} is readable by others (mode {mode:o}); chmod 600 it")]
    CredentialsExposed { path: String, mode: u32 },
    #[error("credentials file {path}, line {line}: {why}")]
    CredentialsSyntax { path: String, line: usize, why: String },
    #[error("{0}")]
    Store(#[from] object_store::Error),
}

/// Builds the client of `bucket`. Credentials come from `credentials_file` when the
/// bucket names one (S3 and Azure: `KEY=value` lines; GCS: the service account JSON),
/// else from the environment the provider's own tools read.
pub fn connect(bucket: &Bucket) -> Result<Remote, ClientError> {
    let meter = Arc::new(Meter::new(bucket.bandwidth));
    let connector = Metered { meter: meter.clone() };
    let secrets = match &bucket.credentials_file {
        Some(path) if bucket.provider != Provider::Gcs => read_env_file(path)?,
        Some(path) => {
            check_private(path)?;
            Vec::new()
        }
        None => Vec::new(),
    };
    let mut lock = None;
    let (store, multipart): (Arc<dyn ObjectStore>, Arc<dyn MultipartStore>) = match bucket.provider {
        Provider::S3 => {
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(&bucket.bucket)
                .with_http_connector(connector)
                .with_retry(retry());
            if let Some(region) = &bucket.region {
                b = b.with_region(region);
            }
            if let Some(endpoint) = &bucket.endpoint {
                b = b
                    .with_endpoint(endpoint)
                    .with_virtual_hosted_style_request(false)
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            for (k, v) in &secrets {
                if let Ok(key) = k.to_ascii_lowercase().parse::<object_store::aws::AmazonS3ConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            if bucket.immutable_days.is_some() {
                // S3 takes no upload into a locked bucket without a checksum.
                b = b.with_checksum_algorithm(object_store::aws::Checksum::SHA256);
            }
            use object_store::aws::AmazonS3ConfigKey as K;
            let region = b.get_config_value(&K::Region).unwrap_or_else(|| "us-east-1".into());
            let base = match b.get_config_value(&K::Endpoint) {
                Some(e) => format!("{}/{}", e.trim_end_matches('/'), bucket.bucket),
                None => format!("https://s3.{region}.amazonaws.com/{}", bucket.bucket),
            };
            let s = Arc::new(b.build()?);
            if bucket.immutable_days.is_some() {
                let http = reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(30))
                    .timeout(Duration::from_secs(60))
                    .build()
                    .map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?;
                lock = Some(super::lock::Locker { s3: s.clone(), base, region, http });
            }
            (s.clone(), s)
        }
        Provider::Gcs => {
            let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&bucket.bucket)
                .with_http_connector(connector)
                .with_retry(retry());
            if let Some(path) = &bucket.credentials_file {
                b = b.with_service_account_path(path.to_string_lossy());
            }
            if let Some(endpoint) = &bucket.endpoint {
                // The base of the XML and JSON APIs (an emulator, a private endpoint);
                // `with_url` would read it as `gs://bucket`.
                use object_store::gcp::GoogleConfigKey as K;
                b = b.with_config(K::BaseUrl, endpoint.trim_end_matches('/')).with_config(
                    K::Client(object_store::ClientConfigKey::AllowHttp),
                    endpoint.starts_with("http://").to_string(),
                );
            }
            let s = Arc::new(b.build()?);
            (s.clone(), s)
        }
        Provider::Azure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(&bucket.bucket)
                .with_http_connector(connector)
                .with_retry(retry());
            if let Some(endpoint) = &bucket.endpoint {
                b = b.with_endpoint(endpoint.clone()).with_allow_http(endpoint.starts_with("http://"));
            }
            for (k, v) in &secrets {
                if let Ok(key) = k.to_ascii_lowercase().parse::<object_store::azure::AzureConfigKey>() {
                    b = b.with_config(key, v);
                }
            }
            let s = Arc::new(b.build()?);
            (s.clone(), s)
        }
    };
    Ok(Remote { store, multipart, meter, lock })
}

/// A few quick retries inside one request; the replicator's own backoff (minutes,
/// resuming from the last acknowledged part) handles anything longer.
fn retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig::default(),
        max_retries: 3,
        retry_timeout: Duration::from_secs(60),
    }
}

fn check_private(path: &std::path::Path) -> Result<(), ClientError> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display().to_string();
    let meta =
        std::fs::metadata(path).map_err(|source| ClientError::CredentialsFile { path: shown.clone(), source })?;
    let mode = meta.mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(ClientError::CredentialsExposed { path: shown, mode });
    }
    Ok(())
}

/// `KEY=value` lines (an optional `export `, `#` comments, optional quotes), as
/// `aws configure export-credentials --format env` writes them.
fn read_env_file(path: &std::path::Path) -> Result<Vec<(String, String)>, ClientError> {
    check_private(path)?;
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|source| ClientError::CredentialsFile { path: shown.clone(), source })?;
    parse_env(&text).map_err(|(line, why)| ClientError::CredentialsSyntax { path: shown, line, why })
}

fn parse_env(text: &str) -> Result<Vec<(String, String)>, (usize, String)> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        // The value is never echoed: it is a secret.
        let (k, v) = line.split_once('=').ok_or((i + 1, "expected KEY=value".to_string()))?;
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((i + 1, format!("{k:?} is not a variable name")));
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

#[derive(Debug)]
struct Metered {
    meter: Arc<Meter>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("sent", &self.sent()).finish_non_exhaustive()
    }
}

impl HttpConnector for Metered {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        // No overall deadline: our stall detector bounds a silent request, and a
        // deadline would kill a slow but progressing part (the reference system's
        // failure). `ClientOptions` configure only object_store's own client.
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| object_store::Error::Generic { store: "http", source: Box::new(e) })?;
        Ok(HttpClient::new(MeteredService { client, meter: self.meter.clone() }))
    }
}

#[derive(Debug)]
struct MeteredService {
    client: reqwest::Client,
    meter: Arc<Meter>,
}

#[async_trait::async_trait]
impl HttpService for MeteredService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, body) = req.into_parts();
        let url: reqwest::Url = parts.uri.to_string().parse().map_err(|e| HttpError::new(HttpErrorKind::Request, e))?;
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = parts.headers;
        // The body becomes a stream of slices, which reqwest would send chunked;
        // S3 refuses some requests without a length (411 on a batch delete).
        if let Some(len) = http_body::Body::size_hint(&body).exact()
            && !request.headers().contains_key(http::header::CONTENT_LENGTH)
        {
            request.headers_mut().insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
        }
        let meter = self.meter.clone();
        meter.touch();
        // Frames cut into slices, each paced and counted as it is taken.
        let slices =
            futures_util::stream::unfold((body, Bytes::new(), meter), |(mut body, mut left, meter)| async move {
                loop {
                    if !left.is_empty() {
                        let slice = left.split_to(left.len().min(SLICE));
                        meter.pace(slice.len()).await;
                        meter.sent.fetch_add(slice.len() as u64, Ordering::Relaxed);
                        meter.touch();
                        return Some((Ok::<_, HttpError>(slice), (body, left, meter)));
                    }
                    match body.frame().await? {
                        Ok(frame) => {
                            if let Ok(data) = frame.into_data() {
                                left = data;
                            }
                        }
                        Err(e) => return Some((Err(e), (body, left, meter))),
                    }
                }
            });
        *request.body_mut() = Some(reqwest::Body::wrap_stream(slices));
        let response = self.client.execute(request).await.map_err(|e| HttpError::new(kind_of(&e), e))?;
        self.meter.touch();
        let response: http::Response<reqwest::Body> = response.into();
        let (parts, body) = response.into_parts();
        let meter = self.meter.clone();
        let body = body
            .map_frame(move |f| {
                meter.touch();
                f
            })
            .map_err(|e| HttpError::new(HttpErrorKind::Interrupted, e));
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

fn kind_of(e: &reqwest::Error) -> HttpErrorKind {
    if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_body() {
        HttpErrorKind::Interrupted
    } else {
        HttpErrorKind::Request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_files_parse_like_a_shell_would_and_never_echo_values() {
        let got =
            parse_env("# s3\nexport AWS_ACCESS_KEY_ID=AKIA1\nAWS_SECRET_ACCESS_KEY=\"se=cret\"\n\n AWS_REGION='eu' \n")
                .expect("parses");
        assert_eq!(
            got,
            [
                ("AWS_ACCESS_KEY_ID".to_string(), "AKIA1".to_string()),
                ("AWS_SECRET_ACCESS_KEY".into(), "se=cret".into()),
                ("AWS_REGION".into(), "eu".into())
            ]
        );
        let (line, why) = parse_env("A=1\nhunter2\n").expect_err("no =");
        assert_eq!(line, 2);
        assert!(!why.contains("hunter2"), "{why}");
        assert!(parse_env("BAD KEY=1").is_err());
    }

    /// One request to a loopback listener: its request line and headers, answered
    /// 404.
    fn one_request() -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let seen = std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut reader = std::io::BufReader::new(conn);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("read");
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                head.push_str(&line);
            }
            let mut conn = reader.into_inner();
            conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").expect("reply");
            head
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_gcs_endpoint_is_where_requests_go_with_the_service_account_of_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("gcs.json");
        // An emulator's service account: no OAuth exchange, no signing.
        std::fs::write(&key, r#"{"client_email": "", "private_key": "", "private_key_id": "", "disable_oauth": true}"#)
            .expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let (url, seen) = one_request();
        let bucket = Bucket {
            endpoint: Some(format!("{url}/")),
            credentials_file: Some(key),
            ..Bucket::with_defaults(nbackup_protocol::Name::new("offsite").expect("name"), Provider::Gcs, "fleet")
        };
        let remote = connect(&bucket).expect("client");
        use object_store::ObjectStoreExt;
        let got = remote.store.head(&object_store::path::Path::from("nb/web-01/etc/a.tar.zst")).await;
        assert!(matches!(got, Err(object_store::Error::NotFound { .. })), "{got:?}");
        let head = seen.join().expect("listener");
        // object_store escapes every byte of the object's name but letters and digits;
        // GCS unescapes them.
        let line = head.lines().next().unwrap_or_default();
        let path = line.strip_prefix("HEAD ").and_then(|l| l.strip_suffix(" HTTP/1.1")).unwrap_or_default();
        let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
        assert_eq!(path, "/fleet/nb/web-01/etc/a.tar.zst", "{head}");
        assert!(head.to_ascii_lowercase().contains(&format!("host: {}", &url["http://".len()..])), "{head}");
    }

    #[test]
    fn a_credentials_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("s3.env");
        std::fs::write(&f, "AWS_ACCESS_KEY_ID=x\n").expect("write");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(read_env_file(&f), Err(ClientError::CredentialsExposed { .. })));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(read_env_file(&f).expect("private").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_throttle_is_not_a_stall() {
        let meter = Meter::new(Some(64 * 1024));
        meter.touch();
        meter.pace(SLICE).await;
        let start = Instant::now();
        meter.pace(SLICE).await; // a second's wait at 64 KiB/s
        assert!(start.elapsed() >= Duration::from_millis(900), "it did wait");
        assert!(meter.idle() < Duration::from_millis(50), "{:?}", meter.idle());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(meter.idle() >= Duration::from_secs(3), "silence counts when nothing waits for the throttle");
    }
}
