//! What is known of an archive's off-site copies: `<archive>.offsite.json`, beside the
//! manifest.
//!
//! The file is the upload queue. The commit writes it (every bucket of the storage
//! `queued`) in the same step as the manifest, before rotation, so an archive can
//! never be committed without its copies being owed; after that the replicator is its
//! only writer. A multipart upload in progress records its id and the parts the
//! provider acknowledged, so a restarted server resumes it where it stopped, or
//! aborts it when it can no longer finish (it never lingers, accruing cost).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use nbackup_protocol::manifest::hex;

use crate::fsutil;

/// Suffix of the sidecar, after the archive's name.
pub const SUFFIX: &str = ".offsite.json";

/// `<archive>.offsite.json`.
pub fn path_for(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(SUFFIX);
    PathBuf::from(s)
}

/// Every bucket's copy of one archive, by bucket name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Copies {
    pub buckets: BTreeMap<String, Copy>,
}

/// Where one copy stands (the admin API's word for it).
pub use nbackup_protocol::admin::OffsiteState as CopyState;

/// One bucket's copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Copy {
    pub state: CopyState,
    /// Unix seconds the copy was queued; the oldest unreplicated age comes from it.
    pub queued_at: u64,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Multipart>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<u64>,
    /// The object's entity tag once verified, for `ctl sync` to recognise it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e_tag: Option<String>,
    /// When the objects' lock ends (unix seconds), on a bucket with `immutable_days`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_until: Option<u64>,
}

impl Copy {
    pub fn queued(now: u64) -> Self {
        Copy {
            state: CopyState::Queued,
            queued_at: now,
            attempts: 0,
            error: None,
            upload: None,
            verified_at: None,
            e_tag: None,
            locked_until: None,
        }
    }

    pub fn is_verified(&self) -> bool {
        self.state == CopyState::Verified
    }

    /// Whether nothing more is owed: verified, or not wanted by the bucket's
    /// retention.
    pub fn is_settled(&self) -> bool {
        matches!(self.state, CopyState::Verified | CopyState::NotKept)
    }
}

/// A multipart upload the provider knows of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Multipart {
    pub key: String,
    pub id: String,
    pub part_size: u64,
    /// The provider's id of each part acknowledged, in order from part 0: the
    /// contiguous prefix only (a part finished out of order is sent again after a
    /// restart, which costs one part, never a wrong object).
    pub parts: Vec<String>,
    /// MD5 of each of those parts, for the composite entity tag.
    pub md5: Vec<String>,
}

impl Copies {
    /// Every bucket in `names` queued.
    pub fn queued<'a>(names: impl IntoIterator<Item = &'a str>, now: u64) -> Self {
        Copies { buckets: names.into_iter().map(|n| (n.to_string(), Copy::queued(now))).collect() }
    }

    /// Reads the sidecar of `archive`; `None` if it has none (an archive committed
    /// while its storage had no buckets).
    pub fn load(archive: &Path) -> io::Result<Option<Self>> {
        match std::fs::read(path_for(archive)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", path_for(archive).display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes it atomically and durably.
    pub fn store(&self, archive: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        fsutil::write_atomic(&path_for(archive), &json)
    }

    /// Buckets whose copy is still owed.
    pub fn pending(&self) -> Vec<&str> {
        self.buckets.iter().filter(|(_, c)| !c.is_settled()).map(|(n, _)| n.as_str()).collect()
    }
}

/// An S3-style entity tag of a multipart object: the MD5 of the parts' MD5s, a dash,
/// and the number of parts. GCS's XML API computes it the same way; a provider that
/// does not (Azure, S3 with SSE-KMS) is checked by size and our SHA-256 alone.
pub fn composite_e_tag(part_md5s: &[String]) -> Option<String> {
    use md5::Digest;
    let mut all = md5::Md5::new();
    for hex in part_md5s {
        all.update(nbackup_protocol::manifest::unhex(hex)?);
    }
    Some(format!("{}-{}", hex(&all.finalize()), part_md5s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_round_trips_and_says_what_is_owed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let archive = dir.path().join("a-b-20261201T000000Z.tar.zst");
        assert_eq!(Copies::load(&archive).expect("load"), None);
        let mut c = Copies::queued(["s3", "cold"], 100);
        assert!(!c.pending().is_empty());
        c.buckets.get_mut("s3").expect("s3").state = CopyState::Verified;
        assert_eq!(c.pending(), ["cold"]);
        c.buckets.get_mut("cold").expect("cold").upload = Some(Multipart {
            key: "p/a/b/x".into(),
            id: "upload-1".into(),
            part_size: 5 << 20,
            parts: vec!["\"e1\"".into()],
            md5: vec!["00".repeat(16)],
        });
        c.store(&archive).expect("store");
        assert_eq!(Copies::load(&archive).expect("load"), Some(c.clone()));
        c.buckets.get_mut("cold").expect("cold").state = CopyState::NotKept;
        assert!(c.pending().is_empty(), "an archive the retention does not keep is owed nothing");
        std::fs::write(path_for(&archive), b"{\"buckets\":{},\"x\":1}").expect("write");
        assert!(Copies::load(&archive).is_err(), "unknown fields are refused, not dropped");
    }

    #[test]
    fn the_composite_tag_is_what_s3_computes() {
        // Two parts whose MD5s are known; S3 reports md5(md5(p1) ‖ md5(p2)) "-2".
        use md5::Digest;
        let (p1, p2) = (vec![1u8; 5 << 20], vec![2u8; 1000]);
        let m1 = hex(&md5::Md5::digest(&p1));
        let m2 = hex(&md5::Md5::digest(&p2));
        let mut both = md5::Md5::digest(&p1).to_vec();
        both.extend_from_slice(&md5::Md5::digest(&p2));
        let want = format!("{}-2", hex(&md5::Md5::digest(&both)));
        assert_eq!(composite_e_tag(&[m1, m2]), Some(want));
        assert_eq!(composite_e_tag(&["zz".into()]), None);
    }
}
