//! Both daemons watch their own certificates: when each ends, for status and
//! metrics, and a `cert_expiring` event once a day while one is within
//! `tls.warn_before` of its end (or already past it).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use nbackup_protocol::admin::CertExpiry;

/// How often a daemon re-reads its certificate files.
pub const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// A warning is repeated at most this often per certificate.
const WARN_EVERY_SECS: i64 = 86_400;

#[derive(Default)]
pub struct CertWatch {
    seen: Mutex<BTreeMap<String, (CertExpiry, Option<i64>)>>,
}

impl CertWatch {
    /// Re-reads `certs` (label, PEM file) and returns the warnings now due, one
    /// message each. Blocking (reads files).
    pub fn check(&self, certs: &[(&str, &Path)], warn_before: Duration, now: i64) -> Vec<String> {
        let mut seen = crate::lock(&self.seen);
        let mut due = Vec::new();
        for (label, path) in certs {
            let read = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|pem| crate::pki::describe_pem(&pem).map_err(|e| format!("{}: {e}", path.display())));
            let expiry = match read {
                Ok(infos) => CertExpiry {
                    cert: label.to_string(),
                    subject: infos[0].subject.clone(),
                    not_after: Some(infos[0].not_after),
                    error: None,
                },
                Err(error) => {
                    CertExpiry { cert: label.to_string(), subject: String::new(), not_after: None, error: Some(error) }
                }
            };
            let warned = seen.get(*label).and_then(|(_, w)| *w);
            let mut warned_now = warned;
            if let Some(end) = expiry.not_after {
                let left = end - now;
                let quiet = warned.is_some_and(|w| now - w < WARN_EVERY_SECS);
                if left < warn_before.as_secs() as i64 && !quiet {
                    due.push(if left <= 0 {
                        format!("the {label} certificate {:?} expired {} ago", expiry.subject, words(-left))
                    } else {
                        format!("the {label} certificate {:?} expires in {}", expiry.subject, words(left))
                    });
                    warned_now = Some(now);
                }
            }
            seen.insert(label.to_string(), (expiry, warned_now));
        }
        due
    }

    /// When the certificate under `label` ends, as last read.
    pub fn not_after(&self, label: &str) -> Option<i64> {
        crate::lock(&self.seen).get(label).and_then(|(e, _)| e.not_after)
    }

    pub fn snapshot(&self) -> Vec<CertExpiry> {
        crate::lock(&self.seen).values().map(|(e, _)| e.clone()).collect()
    }
}

fn words(secs: i64) -> String {
    match secs {
        s if s >= 2 * 86_400 => format!("{} days", s / 86_400),
        s if s >= 2 * 3600 => format!("{} hours", s / 3600),
        s => format!("{} minutes", (s / 60).max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_within_the_window_once_a_day() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::pki::new_ca("test CA", 10).expect("ca");
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, &ca.cert_pem).expect("write");
        let w = CertWatch::default();
        let now = crate::state::unix_now() as i64;
        let week = Duration::from_secs(7 * 86_400);
        assert!(w.check(&[("ca", &path)], week, now).is_empty(), "ten days left, a week's window");
        let later = now + 4 * 86_400 + 43_200;
        let due = w.check(&[("ca", &path)], week, later);
        assert_eq!(due.len(), 1);
        assert!(due[0].contains("expires in 5 days"), "{due:?}");
        assert!(w.check(&[("ca", &path)], week, later + 3600).is_empty(), "not again within a day");
        assert_eq!(w.check(&[("ca", &path)], week, later + 86_400).len(), 1);
        assert!(w.check(&[("ca", &path)], week, now + 30 * 86_400)[0].contains("expired"));
        let missing = dir.path().join("gone.crt");
        assert!(w.check(&[("agent", &missing)], week, now).is_empty());
        let snap = w.snapshot();
        assert!(
            snap.iter().any(|e| e.cert == "agent" && e.error.as_deref().is_some_and(|m| m.contains("cannot read")))
        );
    }
}
