//! Human units in config files: sizes (`256mb`, `1gib`) and durations (`30s`, `1h30m`).
//!
//! Size suffixes are binary everywhere (`1kb` = `1kib` = 1024 bytes), as in the system
//! nbackup replaces, so existing configs mean the same thing.

use std::fmt;
use std::time::Duration;

/// A size in bytes, written `1048576`, `64k`, `256mb`, `1.5gib`, …
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub fn bytes(self) -> u64 {
        self.0
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult = match unit {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::GIB * 1024,
            _ => return Err(format!("unknown size unit {unit:?} in {text:?}; use b, kb, mb, gb or tb")),
        };
        if num.is_empty() {
            return Err(format!("{text:?} is not a size; write e.g. 256mb or 1gib"));
        }
        let value: f64 = num.parse().map_err(|_| format!("{text:?} is not a size; write e.g. 256mb"))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("{text:?} is too large"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact spelling, so a value written back reads the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, mult) in [("tib", Self::GIB * 1024), ("gib", Self::GIB), ("mib", Self::MIB), ("kib", Self::KIB)] {
            if b >= mult && b.is_multiple_of(mult) {
                return write!(f, "{}{unit}", b / mult);
            }
        }
        write!(f, "{b}b")
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 256mb or 1gib")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A duration written `500ms`, `30s`, `5m`, `1h30m`, `2d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim().to_ascii_lowercase();
        if t.is_empty() {
            return Err("empty duration; write e.g. 30s or 5m".into());
        }
        let mut total = Duration::ZERO;
        let mut rest = t.as_str();
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!("{text:?} is not a duration; write e.g. 30s, 5m or 1h30m"));
            }
            let value: u64 = rest[..digits].parse().map_err(|_| format!("{text:?}: number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let part = match unit {
                "ms" => Duration::from_millis(value),
                "s" => Duration::from_secs(value),
                "m" => Duration::from_secs(value.saturating_mul(60)),
                "h" => Duration::from_secs(value.saturating_mul(3600)),
                "d" => Duration::from_secs(value.saturating_mul(86400)),
                "" => return Err(format!("{text:?} needs a unit: ms, s, m, h or d")),
                other => return Err(format!("unknown duration unit {other:?} in {text:?}; use ms, s, m, h or d")),
            };
            total = total.saturating_add(part);
        }
        Ok(HumanDuration(total))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.as_secs() == 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        for (unit, mult) in [("d", 86400), ("h", 3600), ("m", 60)] {
            if s.is_multiple_of(mult) {
                return write!(f, "{}{unit}", s / mult);
            }
        }
        write!(f, "{s}s")
    }
}

impl<'de> serde::Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_sizes() {
        assert_eq!(ByteSize::parse("256mb"), Ok(ByteSize(256 << 20)));
        assert_eq!(ByteSize::parse("1GiB"), Ok(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("64k"), Ok(ByteSize(64 << 10)));
        assert_eq!(ByteSize::parse("1.5m"), Ok(ByteSize(3 << 19)));
        assert_eq!(ByteSize::parse("12345"), Ok(ByteSize(12345)));
        assert_eq!(ByteSize::parse("7 mb"), Ok(ByteSize(7 << 20)));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(ByteSize::parse("mb").is_err());
        assert!(ByteSize::parse("12xb").unwrap_err().contains("unknown size unit"));
        assert!(ByteSize::parse("1.2.3m").is_err());
        assert!(ByteSize::parse("99999999999999tb").is_err());
    }

    #[test]
    fn displays_sizes_exactly() {
        for s in ["256mib", "1gib", "64kib", "1000b", "1536kib"] {
            assert_eq!(ByteSize::parse(s).map(|b| b.to_string()), Ok(s.to_string()));
        }
    }

    #[test]
    fn accepts_durations() {
        assert_eq!(HumanDuration::parse("30s"), Ok(HumanDuration(Duration::from_secs(30))));
        assert_eq!(HumanDuration::parse("5m"), Ok(HumanDuration(Duration::from_secs(300))));
        assert_eq!(HumanDuration::parse("1h30m"), Ok(HumanDuration(Duration::from_secs(5400))));
        assert_eq!(HumanDuration::parse("250ms"), Ok(HumanDuration(Duration::from_millis(250))));
        assert_eq!(HumanDuration::parse("2d"), Ok(HumanDuration(Duration::from_secs(172800))));
    }

    #[test]
    fn rejects_bad_durations() {
        assert!(HumanDuration::parse("30").unwrap_err().contains("needs a unit"));
        assert!(HumanDuration::parse("5 minutes").is_err());
        assert!(HumanDuration::parse("").is_err());
        assert!(HumanDuration::parse("s").is_err());
    }

    #[test]
    fn displays_durations() {
        for s in ["30s", "5m", "2h", "1d", "250ms", "90s"] {
            assert_eq!(HumanDuration::parse(s).map(|d| d.to_string()), Ok(s.to_string()));
        }
    }
}
