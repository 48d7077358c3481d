//! S3 Object Lock: each object of a copy is put under a compliance-mode retention
//! for `immutable_days`, then read back, so the copy is not `verified` before the
//! lock is known to hold.
//!
//! `object_store` writes to locked buckets but cannot set an object's retention, so
//! the two requests — `PutObjectRetention`, then a `HEAD` of the object, whose lock
//! headers S3 returns to a caller allowed `s3:GetObjectRetention` — are made here,
//! signed with the store's own credentials and SigV4 signer. Compliance mode, because
//! governance mode can be lifted by anyone with `s3:BypassGovernanceRetention`,
//! which is what an attacker holding the server's credentials would use.

use std::sync::Arc;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use md5::Digest;
use object_store::aws::{AmazonS3, AwsAuthorizer};

/// What a lock needs besides the key: the bucket's address and the signer's region.
#[derive(Debug)]
pub struct Locker {
    pub(super) s3: Arc<AmazonS3>,
    /// `<endpoint>/<bucket>` (path-style, as the store itself is configured).
    pub(super) base: String,
    pub(super) region: String,
    pub(super) http: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{0}")]
    Store(#[from] object_store::Error),
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("the bucket refused to lock {key}: {status}: {body}")]
    Refused { key: String, status: u16, body: String },
    #[error("{key} is not locked as asked: {found}")]
    Weaker { key: String, found: String },
}

impl Locker {
    /// Locks `key` in compliance mode until `until` and checks that it holds.
    pub async fn hold(&self, key: &str, until: DateTime<Utc>) -> Result<(), LockError> {
        let until_text = until.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let body = format!(
            "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode>\
             <RetainUntilDate>{until_text}</RetainUntilDate></Retention>"
        );
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body.as_bytes()));
        self.send(http::Method::PUT, key, "?retention", body, Some(md5)).await?;
        // What the object says of itself (GetObjectRetention is not implemented by
        // every S3-compatible server; the HEAD headers are).
        let headers = self.send(http::Method::HEAD, key, "", String::new(), None).await?;
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let mode = header("x-amz-object-lock-mode");
        let held = header("x-amz-object-lock-retain-until-date")
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        // Providers round the date; a second short is still the lock asked for.
        match (mode.as_deref(), held) {
            (Some("COMPLIANCE"), Some(t)) if t + chrono::Duration::seconds(1) >= until => Ok(()),
            _ => Err(LockError::Weaker {
                key: key.to_string(),
                found: format!(
                    "mode {}, until {}",
                    mode.as_deref().unwrap_or("none"),
                    held.map_or("none".into(), |t| t.to_rfc3339())
                ),
            }),
        }
    }

    /// One signed request for `key` (with `query`); the response's headers.
    async fn send(
        &self,
        method: http::Method,
        key: &str,
        query: &str,
        body: String,
        md5: Option<String>,
    ) -> Result<http::HeaderMap, LockError> {
        let url = format!("{}/{}{query}", self.base, encode_key(key));
        let mut request = http::Request::builder().method(method.clone()).uri(&url);
        if let Some(md5) = &md5 {
            request = request.header("content-md5", md5).header(http::header::CONTENT_TYPE, "application/xml");
        }
        let mut request = request
            .body(object_store::client::HttpRequestBody::from(body.clone()))
            .map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?;
        let credential = self.s3.credentials().get_credential().await?;
        AwsAuthorizer::new(&credential, "s3", &self.region).try_authorize(&mut request, None)?;
        let mut send = self.http.request(method, &url).body(body);
        for (name, value) in request.headers() {
            send = send.header(name, value);
        }
        let response = send.send().await?;
        let status = response.status();
        let headers = response.headers().clone();
        if !status.is_success() {
            // An error document is short; anything else is not shown.
            let mut text = response.text().await.unwrap_or_default();
            if !text.starts_with('<') || text.len() > 1000 {
                text = format!("{} bytes", text.len());
            }
            return Err(LockError::Refused { key: key.to_string(), status: status.as_u16(), body: text });
        }
        Ok(headers)
    }
}

/// A key as a URL path: each segment percent-encoded but for RFC 3986's unreserved
/// characters, as SigV4 canonicalises it.
fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_as_sigv4_expects() {
        assert_eq!(encode_key("fleet/web-01/etc/a b+c.tar.zst"), "fleet/web-01/etc/a%20b%2Bc.tar.zst");
    }
}
