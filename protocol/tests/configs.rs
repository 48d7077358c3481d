//! Config files are fixtures: every example parses, every invalid file fails with the
//! message its first line announces (`# expect: …`,
//! one line per fragment that must appear).

use std::path::{Path, PathBuf};

use nbackup_protocol::config::{AgentConfig, ServerConfig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .expect("fixture directory exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    out.sort();
    out
}

fn parse(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).expect("fixture is readable");
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.starts_with("agent") {
        AgentConfig::parse(&text, path).map(drop).map_err(|e| e.to_string())
    } else if name.starts_with("server") {
        ServerConfig::parse(&text, path).map(drop).map_err(|e| e.to_string())
    } else {
        panic!("fixture {name} must start with agent or server");
    }
}

#[test]
fn every_example_config_parses() {
    let examples = files("configs");
    assert!(examples.len() >= 2, "expected the agent and server examples");
    for path in examples {
        if let Err(e) = parse(&path) {
            panic!("{} does not parse:\n{e}", path.display());
        }
    }
}

#[test]
fn every_invalid_config_fails_with_its_message() {
    let fixtures = files("tests/invalid_configs");
    assert!(fixtures.len() >= 20);
    for path in fixtures {
        let text = std::fs::read_to_string(&path).expect("fixture is readable");
        let expects: Vec<&str> = text.lines().map_while(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expects.is_empty(), "{} lacks an `# expect:` first line", path.display());
        match parse(&path) {
            Ok(()) => panic!("{} parsed but should fail with {expects:?}", path.display()),
            Err(msg) => {
                for expect in expects {
                    assert!(msg.contains(expect), "{}:\n  expected: {expect}\n  got:      {msg}", path.display());
                }
            }
        }
    }
}

#[test]
fn example_values_are_what_the_comments_say() {
    let path = repo().join("configs/agent.example.yaml");
    let text = std::fs::read_to_string(&path).expect("example exists");
    let cfg = AgentConfig::parse(&text, &path).expect("example parses");
    assert_eq!(cfg.name.as_str(), "web-01");
    assert_eq!(cfg.server.server_name, "backup.example.com");
    assert_eq!(cfg.resume.buffer_size, 256 << 20);
    assert_eq!(cfg.resume.chunk_size, 1 << 20);
    assert_eq!(cfg.backups[1].parallels, 4);
    assert_eq!(cfg.backups[1].sources.len(), 2);
    assert_eq!(cfg.backups[0].schedule.as_ref().map(|s| s.as_str()), Some("0 2 * * *"));

    let path = repo().join("configs/server.example.yaml");
    let text = std::fs::read_to_string(&path).expect("example exists");
    let cfg = ServerConfig::parse(&text, &path).expect("example parses");
    assert_eq!(cfg.storages.len(), 2);
    let configs = cfg.storages.values().find(|s| s.name.as_str() == "configs").expect("configs storage");
    assert_eq!(configs.level, 3, "zstd default level");
    assert_eq!(cfg.session_ttl.as_secs(), 3600);
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let text = "server: {listen: \"127.0.0.1:1\"}\ntls: {ca_cert: pki/ca.crt, server_cert: s.crt, server_key: /abs/s.key}\nstorages: {m: {base_dir: data, max_backups: 1, compression: gzip}}\n";
    let cfg = ServerConfig::parse(text, Path::new("/etc/nbackup/server.yaml")).expect("valid");
    assert_eq!(cfg.tls.ca_cert, Path::new("/etc/nbackup/pki/ca.crt"));
    assert_eq!(cfg.tls.key, Path::new("/abs/s.key"));
    assert_eq!(cfg.storages.values().next().map(|s| s.base_dir.clone()), Some(PathBuf::from("/etc/nbackup/data")));
}

#[test]
#[ignore = "prints every fixture's message for review"]
fn print_messages() {
    for path in files("tests/invalid_configs") {
        println!("{}\n", parse(&path).expect_err("fixture is invalid"));
    }
}

/// Every key the config types have, as paths (`storages.<name>.base_dir`,
/// `backups[].sources[].path`): the example parsed into the raw types and written
/// back, so a field the example leaves out still appears (as null).
fn keys_of(value: &serde_yaml::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    // Maps keyed by the operator's own names.
    const NAMED: [&str; 2] = ["storages", "backups[].bandwidth_schedule"];
    match value {
        serde_yaml::Value::Mapping(m) => {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default();
                let path = if NAMED.contains(&prefix) {
                    format!("{prefix}.<name>")
                } else if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                if NAMED.contains(&prefix) && !matches!(v, serde_yaml::Value::Mapping(_)) {
                    out.insert(path);
                    continue;
                }
                out.insert(path.clone());
                keys_of(v, &path, out);
            }
        }
        serde_yaml::Value::Sequence(items) => {
            for item in items {
                keys_of(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

fn type_keys(file: &str) -> std::collections::BTreeSet<String> {
    let path = repo().join(file);
    let text = std::fs::read_to_string(&path).expect("example exists");
    let value = if file.contains("agent") {
        serde_yaml::to_value(serde_yaml::from_str::<nbackup_protocol::config::RawAgentConfig>(&text).expect("parses"))
    } else {
        serde_yaml::to_value(serde_yaml::from_str::<nbackup_protocol::config::RawServerConfig>(&text).expect("parses"))
    }
    .expect("serializes");
    let mut out = std::collections::BTreeSet::new();
    keys_of(&value, "", &mut out);
    out
}

/// The keys `docs/configuration.md` documents under `## <heading>`: the first
/// backticked word of each table row.
fn documented_keys(heading: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("docs/configuration.md")).expect("docs/configuration.md exists");
    let mut out = std::collections::BTreeSet::new();
    let mut inside = false;
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            inside = h.trim() == heading;
            continue;
        }
        if inside && line.starts_with("| `") {
            let key = line.trim_start_matches("| `").split('`').next().unwrap_or_default();
            out.insert(key.to_string());
        }
    }
    out
}

#[test]
fn the_configuration_reference_documents_every_key_and_no_other() {
    for (file, heading) in
        [("configs/server.example.yaml", "server.yaml"), ("configs/agent.example.yaml", "agent.yaml")]
    {
        let types = type_keys(file);
        let docs = documented_keys(heading);
        let undocumented: Vec<_> = types.difference(&docs).collect();
        let unknown: Vec<_> = docs.difference(&types).collect();
        assert!(
            undocumented.is_empty() && unknown.is_empty(),
            "docs/configuration.md, {heading}:\n  keys without a row: {undocumented:#?}\n  rows for no key: {unknown:#?}"
        );
    }
}
