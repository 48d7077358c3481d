//! Config errors that say where (file:line:column), what, and what to do.

use std::fmt;
use std::path::{Path, PathBuf};

/// An error in a config file, located as precisely as the parser allows. Boxed so
/// that `Result<Config, ConfigError>` stays small; the details are public via `Deref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(Box<ConfigErrorDetails>);

impl std::ops::Deref for ConfigError {
    type Target = ConfigErrorDetails;
    fn deref(&self) -> &ConfigErrorDetails {
        &self.0
    }
}

/// Where and what a [`ConfigError`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrorDetails {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `backups[1].parallels`.
    pub key: Option<String>,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl From<ConfigErrorDetails> for ConfigError {
    fn from(d: ConfigErrorDetails) -> Self {
        ConfigError(Box::new(d))
    }
}

/// Turns serde/YAML errors and validation failures into [`ConfigError`]s for one file.
pub(crate) struct Source<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Source<'_> {
    /// Deserializes `T` from the text, mapping any error to a located [`ConfigError`].
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        if self.text.trim().is_empty()
            || self.text.lines().all(|l| {
                let l = l.trim();
                l.is_empty() || l.starts_with('#') || l == "---"
            })
        {
            return Err(self.error(None, "the file is empty", Some("start from configs/*.example.yaml".into())));
        }
        let de = serde_yaml::Deserializer::from_str(self.text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let loc = inner.location();
            let raw = inner.to_string();
            // yaml_serde prefixes its own path and appends the location; keep the core.
            let mut message = raw.split(" at line ").next().unwrap_or(&raw).to_string();
            if let Some((prefix, rest)) = message.split_once(": ")
                && !prefix.contains(' ')
            {
                message = rest.to_string();
            }
            let hint = unknown_field_hint(&message).or_else(|| missing_field_hint(&message));
            if message.starts_with("unknown field `") {
                message = "unknown key".into();
            }
            let key = (path != "." && !path.is_empty()).then_some(path);
            ConfigError::from(ConfigErrorDetails {
                file: self.file.to_path_buf(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                key,
                message,
                hint,
            })
        })
    }

    /// A validation error for the key at `path` (dotted, with `[i]` indices).
    pub fn error(&self, path: Option<&str>, message: impl Into<String>, hint: Option<String>) -> ConfigError {
        ConfigError::from(ConfigErrorDetails {
            file: self.file.to_path_buf(),
            line: path.and_then(|p| locate(self.text, p)),
            column: None,
            key: path.map(str::to_string),
            message: message.into(),
            hint,
        })
    }
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": suggest the closest.
fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    if expected.is_empty() {
        return Some(format!("`{field}` is not a setting here; remove it"));
    }
    let best = expected
        .iter()
        .map(|cand| (strsim::damerau_levenshtein(field, cand), *cand))
        .min()
        .filter(|(dist, cand)| *dist <= 3.max(cand.len() / 3));
    Some(match best {
        Some((_, cand)) => format!("did you mean `{cand}`?"),
        None => format!("valid keys here: {}", expected.join(", ")),
    })
}

fn missing_field_hint(message: &str) -> Option<String> {
    let rest = message.strip_prefix("missing field `")?;
    let (field, _) = rest.split_once('`')?;
    Some(format!("add `{field}:` (see configs/*.example.yaml)"))
}

/// Finds the 1-based line of a key path like `backups[1].sources[0].path` in
/// block-style YAML, or of the longest prefix of it that exists (so a value written in
/// flow style still points at its key). Best effort: `None` if nothing matches.
pub(crate) fn locate(text: &str, path: &str) -> Option<usize> {
    let target = split_path(path);
    // Stack of (indent, segment) describing the path of the current line.
    let mut stack: Vec<(usize, String)> = Vec::new();
    // Next list index per parent path.
    let mut counters: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut best: Option<(usize, usize)> = None; // (matched segments, line)
    for (lineno, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
            continue;
        }
        let mut indent = line.len() - trimmed.len();
        let mut rest = trimmed;
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        if rest == "-" || rest.starts_with("- ") {
            let parent = stack.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>().join(".");
            let n = counters.entry(format!("{parent}@{indent}")).or_insert(0);
            stack.push((indent, n.to_string()));
            *n += 1;
            let after = rest[1..].trim_start();
            indent += rest.len() - after.len();
            rest = after;
            check(&stack, &target, lineno, &mut best);
        }
        let quoted = rest.starts_with('"') || rest.starts_with('\'');
        if let (false, Some((key, _))) = (quoted, rest.split_once(':')) {
            let key = key.trim();
            if !key.is_empty() && !key.contains(' ') {
                // Nested keys restart list counters below them.
                let prefix = stack.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>().join(".");
                counters.retain(|k, _| !k.starts_with(&format!("{prefix}.{key}")));
                stack.push((indent, key.to_string()));
                check(&stack, &target, lineno, &mut best);
            }
        }
    }
    best.map(|(_, line)| line + 1)
}

fn check(stack: &[(usize, String)], target: &[String], lineno: usize, best: &mut Option<(usize, usize)>) {
    if stack.len() > target.len() {
        return;
    }
    if stack.iter().zip(target).all(|((_, s), t)| s == t) {
        let depth = stack.len();
        if best.is_none_or(|(d, _)| depth > d) {
            *best = Some((depth, lineno));
        }
    }
}

fn split_path(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut part = part;
        while let Some(open) = part.find('[') {
            if open > 0 {
                out.push(part[..open].to_string());
            }
            let close = part[open..].find(']').map_or(part.len(), |c| open + c);
            out.push(part[open + 1..close].to_string());
            part = part.get(close + 1..).unwrap_or("");
        }
        if !part.is_empty() {
            out.push(part.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
agent:
  name: web-01
backups:
  - name: etc
    sources:
      - path: /etc
  - name: www   # second
    parallels: 9
    sources:
      - path: /a
      - path: /b
    exclude: [\"*.log\"]
resume:
  chunk_size: 1mb
";

    #[test]
    fn locates_keys_in_maps_and_lists() {
        assert_eq!(locate(DOC, "agent.name"), Some(2));
        assert_eq!(locate(DOC, "backups[0].name"), Some(4));
        assert_eq!(locate(DOC, "backups[1].name"), Some(7));
        assert_eq!(locate(DOC, "backups[1].parallels"), Some(8));
        assert_eq!(locate(DOC, "backups[1].sources[1].path"), Some(11));
        assert_eq!(locate(DOC, "backups[1].exclude[0]"), Some(12));
        assert_eq!(locate(DOC, "resume.chunk_size"), Some(14));
        assert_eq!(locate(DOC, "resume.buffer_size"), Some(13));
        assert_eq!(locate(DOC, "nothing"), None);
    }

    #[test]
    fn hints_closest_key() {
        assert_eq!(
            unknown_field_hint("unknown field `compresion`, expected one of `base_dir`, `compression`"),
            Some("did you mean `compression`?".into())
        );
        assert_eq!(
            unknown_field_hint("unknown field `zzzzzzzz`, expected `a` or `b`"),
            Some("valid keys here: a, b".into())
        );
    }
}
