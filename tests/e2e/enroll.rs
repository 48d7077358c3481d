//! Enrollment and the certificate lifecycle through the real binary and a real
//! server process: `cert token` → `setup agent` → backups with the issued
//! certificate; single-use, pinned, expiring, name-bound tokens; renewal over mutual
//! TLS; revocation honoured at the next handshake.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nbackup_protocol::admin::{CertOrigin, CertRecord, TokenIssued};

use crate::support::*;

fn nbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nbackup"))
}

fn run(args: &[&str]) -> Output {
    nbackup().args(args).output().expect("nbackup runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

struct Fleet {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    pki: Pki,
    config: PathBuf,
    server: ServerChild,
}

/// A server child process that signs enrollments with the test CA.
fn fleet(tls_extra: &str) -> Fleet {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let pki = Pki::new(&root.join("pki"));
    let (config, addr) = ServerChild::configure(&root, &pki, &[gzip("main")], "");
    let mut yaml = fs::read_to_string(&config).expect("yaml");
    yaml = yaml.replace("  server_key: ", &format!("{tls_extra}  server_key: "));
    yaml.push_str(&format!("enrollment:\n  ca_key: {}\n", pki.dir.join("ca.key").display()));
    fs::write(&config, yaml).expect("yaml");
    let server = ServerChild::start(&config, addr, "");
    Fleet { _tmp: tmp, root, pki, config, server }
}

impl Fleet {
    fn token(&self, agent: &str, extra: &[&str]) -> TokenIssued {
        let mut args = vec!["cert", "token", "--config", s(&self.config), "--agent", agent, "--json"];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("token json")
    }

    /// `nbackup setup agent` as printed by `cert token`, into `dir`.
    fn setup(&self, t: &TokenIssued, name: &str, pin: &str, dir: &Path, src: &Path) -> Output {
        run(&[
            "setup",
            "agent",
            "--server",
            &t.address,
            "--token",
            &t.token,
            "--ca-pin",
            pin,
            "--name",
            name,
            "--dir",
            s(dir),
            "--path",
            s(src),
        ])
    }

    fn certificates(&self) -> Vec<CertRecord> {
        let out = run(&["cert", "list", "--config", s(&self.config), "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        serde_json::from_value(v["issued"].clone()).expect("ledger")
    }

    fn archives(&self, agent: &str) -> Vec<PathBuf> {
        let dir = self.root.join("storage/main").join(agent);
        let mut out: Vec<PathBuf> = walk(&dir).into_iter().filter(|p| is_archive(p)).collect();
        out.sort();
        out
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
}

fn serial_of(cert: &Path) -> String {
    let pem = fs::read_to_string(cert).expect("cert");
    nbackup_daemon::pki::describe_pem(&pem).expect("parses")[0].serial.clone()
}

fn source(root: &Path) -> PathBuf {
    let src = root.join("src");
    fs::create_dir_all(src.join("sub")).expect("src");
    fs::write(src.join("a.txt"), b"enrolled and backed up\n").expect("a");
    fs::write(src.join("sub/b.bin"), noise(200_000, 7)).expect("b");
    src
}

#[test]
fn an_agent_enrolls_with_a_token_once_and_backs_up_with_its_own_key() {
    let f = fleet("");
    let src = source(&f.root);
    let t = f.token("web-02", &[]);
    assert!(t.command.contains("--token") && t.command.contains(&t.ca_pin) && t.command.contains("--name web-02"));
    assert_eq!(t.address, format!("127.0.0.1:{}", f.server.addr.port()), "from the server certificate and port");
    let dir = f.root.join("etc-nbackup");
    let out = f.setup(&t, "web-02", &t.ca_pin, &dir, &src);
    assert!(out.status.success(), "{}", text(&out));
    for file in ["ca.crt", "agent.crt", "agent.key", "agent.yaml"] {
        assert!(dir.join(file).exists(), "{file} written");
    }
    assert_eq!(fs::metadata(dir.join("agent.key")).expect("key").permissions().mode() & 0o777, 0o600);
    let key = fs::read_to_string(dir.join("agent.key")).expect("key");
    assert!(!text(&out).contains(key.lines().nth(1).expect("key body")), "the key is never printed");

    let yaml = dir.join("agent.yaml");
    let out = run(&["backup", "--config", s(&yaml)]);
    assert!(out.status.success(), "the written config backs up: {}", text(&out));
    let archives = f.archives("web-02");
    assert_eq!(archives.len(), 1, "{archives:?}");
    let restored = f.root.join("restored");
    gnu_extract(&archives[0], &restored);
    assert_restored(std::slice::from_ref(&src), &nbackup_protocol::config::Excludes::none(), &restored);

    // The same token again: spent.
    let again = f.setup(&t, "web-02", &t.ca_pin, &f.root.join("again"), &src);
    assert_eq!(again.status.code(), Some(4), "{}", text(&again));
    assert!(text(&again).contains("already used"), "{}", text(&again));
    // The ledger knows what was issued, and the server's book holds no token text.
    let ledger = f.certificates();
    assert_eq!(ledger.len(), 1);
    assert_eq!((ledger[0].agent.as_deref(), ledger[0].origin), (Some("web-02"), CertOrigin::Enrolled));
    assert_eq!(ledger[0].serial, serial_of(&dir.join("agent.crt")));
    let book = fs::read_to_string(f.root.join("state/enrollment.json")).expect("book");
    assert!(!book.contains(&t.token["nbk1-".len()..]), "tokens are stored hashed");
    let events = fs::read_to_string(f.root.join("state/server-events.jsonl")).expect("events");
    assert!(events.contains("\"enrolled\"") && events.contains("already used"), "{events}");
}

#[test]
fn a_wrong_pin_stops_the_agent_before_the_token_leaves_it() {
    let f = fleet("");
    let src = source(&f.root);
    let t = f.token("web-02", &[]);
    let other = nbackup_daemon::pki::new_ca("someone else", 2).expect("ca");
    let wrong = nbackup_daemon::pki::ca_pin(&other.cert_pem).expect("pin").to_string();
    let dir = f.root.join("a");
    let out = f.setup(&t, "web-02", &wrong, &dir, &src);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not the pinned"), "{}", text(&out));
    assert!(!dir.join("agent.key").exists() && !dir.join("agent.crt").exists());
    // Nothing was sent: the token still works, with the right pin.
    let out = f.setup(&t, "web-02", &t.ca_pin, &dir, &src);
    assert!(out.status.success(), "{}", text(&out));
    // Malformed input is a usage error that names the flag.
    let out = run(&["setup", "agent", "--server", &t.address, "--token", "nbk1-abc", "--ca-pin", &t.ca_pin]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--token"), "{}", text(&out));
    let out = run(&["setup", "agent", "--server", &t.address, "--token", &t.token, "--ca-pin", "sha256:00"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn expired_and_misbound_tokens_are_refused_and_recorded() {
    let f = fleet("");
    let src = source(&f.root);
    let short = f.token("web-02", &["--ttl", "1s"]);
    let expires = chrono::DateTime::parse_from_rfc3339(&short.expires_at).expect("rfc3339");
    // Token expiry is wall-clock time; there is no event to wait for.
    while chrono::Utc::now() <= expires {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = f.setup(&short, "web-02", &short.ca_pin, &f.root.join("a"), &src);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("expired"), "{}", text(&out));

    let t = f.token("web-02", &[]);
    let out = f.setup(&t, "web-03", &t.ca_pin, &f.root.join("b"), &src);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert!(text(&out).contains("minted for web-02"), "{}", text(&out));
    let out = f.setup(&t, "web-02", &t.ca_pin, &f.root.join("c"), &src);
    assert_eq!(out.status.code(), Some(4), "a misbound attempt spent it: {}", text(&out));
    assert!(f.certificates().is_empty(), "nothing was issued");
    let events = fs::read_to_string(f.root.join("state/server-events.jsonl")).expect("events");
    assert_eq!(events.matches("\"refused\"").count(), 3, "{events}");
}

#[test]
fn a_renewed_certificate_works_and_a_revoked_one_is_refused_at_the_next_handshake() {
    let f = fleet("");
    let src = source(&f.root);
    let t = f.token("web-02", &[]);
    let dir = f.root.join("agent");
    assert!(f.setup(&t, "web-02", &t.ca_pin, &dir, &src).status.success());
    let yaml = dir.join("agent.yaml");
    let first = serial_of(&dir.join("agent.crt"));
    let out = run(&["cert", "renew", "--config", s(&yaml)]);
    assert!(out.status.success(), "{}", text(&out));
    let second = serial_of(&dir.join("agent.crt"));
    assert_ne!(first, second, "a new certificate");
    assert!(!dir.join("agent.crt.new").exists() && !dir.join("agent.key.new").exists());
    assert!(run(&["backup", "--config", s(&yaml)]).status.success(), "the renewed pair backs up");
    let ledger = f.certificates();
    assert_eq!(ledger.iter().map(|r| r.origin).collect::<Vec<_>>(), [CertOrigin::Enrolled, CertOrigin::Renewed]);

    // Revoke the agent: both its certificates; the next connection fails.
    let out = run(&["cert", "revoke", "--config", s(&f.config), "--agent", "web-02"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 certificate(s)"), "{}", text(&out));
    let out = run(&["backup", "--config", s(&yaml)]);
    assert!(!out.status.success(), "a revoked certificate is refused");
    assert!(text(&out).contains("rejected this agent's certificate"), "{}", text(&out));
    assert_eq!(f.archives("web-02").len(), 1, "only the backup before revocation");

    // A certificate this server never issued is revoked by its file.
    let web01 = f.pki.agent("web-01");
    let cfg = agent_yaml(&f.pki, "web-01", &web01, f.server.addr, &[entry("data", "main", &[&src])], "");
    let web01_yaml = f.root.join("web01.yaml");
    fs::write(&web01_yaml, cfg).expect("yaml");
    assert!(run(&["backup", "--config", s(&web01_yaml)]).status.success());
    let crt = web01.with_extension("crt");
    let out = run(&["cert", "revoke", "--config", s(&f.config), "--cert", s(&crt)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!run(&["backup", "--config", s(&web01_yaml)]).status.success(), "refused after revocation");
    let out = run(&["cert", "revoke", "--config", s(&f.config), "--cert", s(&crt)]);
    assert_eq!(out.status.code(), Some(1), "already revoked: {}", text(&out));
    let listed = run(&["cert", "list", "--config", s(&f.config)]);
    assert!(text(&listed).contains("external"), "{}", text(&listed));
}

#[test]
fn the_server_warns_of_its_own_certificate_ending_and_exports_when() {
    // The test certificates last 60 days: a 90-day window warns at once.
    let f = fleet("  warn_before: 90d\n");
    let events = f.root.join("state/server-events.jsonl");
    let start = std::time::Instant::now();
    // The event is recorded right after readiness; poll its file.
    loop {
        if fs::read_to_string(&events).is_ok_and(|t| t.contains("cert_expiring")) {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "no cert_expiring event");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let text = fs::read_to_string(&events).expect("events");
    assert!(text.contains("the server certificate") && text.contains("expires in"), "{text}");
    let out = run(&["ctl", "--socket", s(&f.root.join("server.sock")), "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status");
    let certs = status["certificates"].as_array().expect("certificates");
    assert!(certs.iter().any(|c| c["cert"] == "server" && c["not_after"].is_i64()), "{certs:?}");
}
