//! Names that end up in file paths: agents, storages and backups.
//!
//! Every name that arrives from a peer or a config file is checked here before it can
//! touch the filesystem. The rules are deliberately narrower than "any valid file name":
//! a name is 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits and `.`, `_`, `-`, `@`,
//! `+`; it starts with a letter or digit; and it never contains `..`. That excludes path
//! separators, NUL, hidden files, traversal and anything a shell would need quoted.

use std::fmt;

use crate::limits::MAX_NAME_LEN;

/// A validated agent, storage or backup name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {0} bytes long; the limit is {MAX_NAME_LEN}")]
    TooLong(usize),
    #[error("name must start with a letter or digit")]
    BadStart,
    #[error("name contains {0:?}; allowed are letters, digits and . _ - @ +")]
    BadChar(char),
    #[error("name contains \"..\"")]
    DotDot,
}

impl Name {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        validate(&s)?;
        Ok(Name(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate(s: &str) -> Result<(), NameError> {
    let first = s.chars().next().ok_or(NameError::Empty)?;
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(s.len()));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameError::BadStart);
    }
    if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'))) {
        return Err(NameError::BadChar(c));
    }
    if s.contains("..") {
        return Err(NameError::DotDot);
    }
    Ok(())
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::new(s)
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::new(s.clone()).map_err(|e| serde::de::Error::custom(format!("invalid name {s:?}: {e}")))
    }
}

/// Identifies one upload session on a server. Random, so that guessing another agent's
/// session is hopeless; ownership is still checked on every use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; 16]);

impl SessionId {
    /// Parses the 32-hex-digit form produced by `Display`.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(SessionId(out))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["web-01", "db.example.com", "a", "backup_2", "x@y+z", "9lives"] {
            assert_eq!(Name::new(ok).map(|n| n.to_string()), Ok(ok.to_string()));
        }
    }

    #[test]
    fn rejects_hostile_names() {
        assert_eq!(Name::new(""), Err(NameError::Empty));
        assert_eq!(Name::new("../x"), Err(NameError::BadStart));
        assert_eq!(Name::new(".hidden"), Err(NameError::BadStart));
        assert_eq!(Name::new("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(Name::new("a\\b"), Err(NameError::BadChar('\\')));
        assert_eq!(Name::new("a\0b"), Err(NameError::BadChar('\0')));
        assert_eq!(Name::new("a..b"), Err(NameError::DotDot));
        assert_eq!(Name::new("a b"), Err(NameError::BadChar(' ')));
        assert_eq!(Name::new("é"), Err(NameError::BadStart));
        assert_eq!(Name::new("x".repeat(97)), Err(NameError::TooLong(97)));
        assert!(Name::new("x".repeat(96)).is_ok());
    }

    #[test]
    fn session_id_hex_round_trips() {
        let id = SessionId([0xab; 16]);
        assert_eq!(SessionId::from_hex(&id.to_string()), Some(id));
        assert_eq!(SessionId::from_hex("zz"), None);
        assert_eq!(SessionId::from_hex(&"g".repeat(32)), None);
    }
}
