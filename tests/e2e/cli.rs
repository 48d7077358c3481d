//! The `nbackup` binary as users run it: certificates, a server child process,
//! backups with `--json`, health, exit codes, signals.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::support::*;

fn nbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nbackup"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("nbackup runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A free port on loopback (bound and released; the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

struct ServerProcess {
    child: Child,
}

impl ServerProcess {
    /// Starts `nbackup server` and waits for its "server ready" log line.
    fn start(config: &Path) -> ServerProcess {
        let mut child =
            nbackup().args(["server", "--config"]).arg(config).stderr(Stdio::piped()).spawn().expect("server starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        loop {
            let line = lines.next().expect("server printed 'server ready' before exiting").expect("utf-8 log");
            if line.contains("server ready") {
                break;
            }
        }
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ServerProcess { child }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), rustix::process::Signal::TERM)
            .expect("SIGTERM");
        self.child.wait().expect("server exits")
    }
}

/// A PKI made with `nbackup cert`, and server/agent configs using it.
fn setup(root: &Path) -> (PathBuf, PathBuf, u16) {
    let pki = root.join("pki");
    let ok = |o: Output| assert!(o.status.success(), "{}", text(&o.stderr));
    ok(run(nbackup().args(["cert", "init-ca", "--out"]).arg(&pki)));
    ok(run(nbackup()
        .args(["cert", "issue", "--ca"])
        .arg(&pki)
        .args(["--server", "127.0.0.1", "--out"])
        .arg(pki.join("server"))));
    ok(run(nbackup()
        .args(["cert", "issue", "--ca"])
        .arg(&pki)
        .args(["--agent", "web-01", "--out"])
        .arg(pki.join("web-01"))));
    let port = free_port();
    let server = root.join("server.yaml");
    fs::write(
        &server,
        format!(
            "server:\n  listen: \"127.0.0.1:{port}\"\ntls:\n  ca_cert: pki/ca.crt\n  server_cert: pki/server.crt\n  server_key: pki/server.key\n\
             state_dir: state\nadmin:\n  socket: server.sock\n\
             storages:\n  main:\n    base_dir: storage\n    max_backups: 3\n    compression: gzip\n"
        ),
    )
    .expect("server.yaml");
    let agent = root.join("agent.yaml");
    fs::write(
        &agent,
        format!(
            "agent:\n  name: web-01\nserver:\n  address: \"127.0.0.1:{port}\"\ntls:\n  ca_cert: pki/ca.crt\n  client_cert: pki/web-01.crt\n  client_key: pki/web-01.key\n\
             backups:\n  - name: data\n    storage: main\n    sources:\n      - path: {}\n  - name: bogus\n    storage: nowhere\n    sources:\n      - path: {}\n\
             retry:\n  max_attempts: 1\n",
            root.join("data").display(),
            root.join("data").display()
        ),
    )
    .expect("agent.yaml");
    dataset(&root.join("data"), "3M", 11);
    (server, agent, port)
}

#[test]
fn the_whole_cli_flow_with_json_results_and_exit_codes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (server_yaml, agent_yaml, _) = setup(tmp.path());
    let key_mode = fs::metadata(tmp.path().join("pki/web-01.key")).expect("key").permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);
    // Refuses to overwrite a CA.
    let o = run(nbackup().args(["cert", "init-ca", "--out"]).arg(tmp.path().join("pki")));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("already exists; pass --force"), "{}", text(&o.stderr));

    // Nothing listens yet: unreachable is exit 3.
    let o = run(nbackup().args(["backup", "--entry", "data", "--config"]).arg(&agent_yaml));
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cannot reach"), "{}", text(&o.stderr));

    let server = ServerProcess::start(&server_yaml);
    let o = run(nbackup().args(["backup", "--json", "--entry", "data", "--config"]).arg(&agent_yaml));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    for key in ["entry", "archive", "bytes_read", "bytes_sent", "files", "skipped", "sha256", "seconds"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    assert_eq!(v["ok"], true);
    assert!(v["bytes_read"].as_u64().expect("number") > 3_000_000);
    let archive = tmp.path().join("storage/web-01/data").join(v["archive"].as_str().expect("name"));
    let manifest = check_manifest(&archive);
    assert_eq!(manifest.sha256, v["sha256"].as_str().expect("sha"));

    // All entries: one commits, one is refused → exit 4, one JSON line each.
    let o = run(nbackup().args(["backup", "--json", "--config"]).arg(&agent_yaml));
    assert_eq!(o.status.code(), Some(4), "{}", text(&o.stderr));
    let lines: Vec<serde_json::Value> =
        text(&o.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[1]["ok"], false);
    assert_eq!(lines[1]["reason"], "unknown storage");

    // Human output names the refusal in plain words.
    let o = run(nbackup().args(["backup", "--entry", "bogus", "--config"]).arg(&agent_yaml));
    assert_eq!(o.status.code(), Some(4));
    assert!(text(&o.stderr).contains("the server has no storage of that name"), "{}", text(&o.stderr));

    let o = run(nbackup().args(["health", "--json", "--config"]).arg(&agent_yaml));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(h["storages"][0]["name"], "main");
    assert!(h["storages"][0]["free_bytes"].as_u64().expect("free") > 0);

    // Unknown entry is a usage error.
    let o = run(nbackup().args(["backup", "--entry", "nope", "--config"]).arg(&agent_yaml));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no backup entry named \"nope\"; entries: data, bogus"));

    // SIGTERM stops the server cleanly.
    assert!(server.terminate().success());
    let extracted = tmp.path().join("x");
    gnu_extract(&archive, &extracted);
    assert_restored(&[tmp.path().join("data")], &nbackup_protocol::config::Excludes::none(), &extracted);
}

#[test]
fn config_errors_and_identity_mismatches_are_usage_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, agent_yaml, _) = setup(tmp.path());
    let typo = tmp.path().join("typo.yaml");
    fs::write(&typo, fs::read_to_string(&agent_yaml).expect("read").replace("max_attempts", "max_atempts"))
        .expect("write");
    let o = run(nbackup().args(["backup", "--config"]).arg(&typo));
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(err.contains("typo.yaml:") && err.contains("retry.max_atempts: unknown key"), "{err}");
    assert!(err.contains("did you mean `max_attempts`?"), "{err}");

    let other = tmp.path().join("other.yaml");
    fs::write(&other, fs::read_to_string(&agent_yaml).expect("read").replace("name: web-01", "name: web-02"))
        .expect("write");
    let o = run(nbackup().args(["backup", "--config"]).arg(&other));
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("agent.name is \"web-02\" but the certificate"), "{}", text(&o.stderr));
}

#[tokio::test]
async fn unreadable_files_and_directories_are_skipped_with_their_reasons() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The agent may run as nobody below; let it reach everything it needs.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("locked-dir/inner")).expect("mkdir");
    fs::write(src.join("locked-dir/inner/x.txt"), b"x").expect("write");
    fs::write(src.join("readable.txt"), b"fine\n").expect("write");
    fs::write(src.join("secret.txt"), b"secret\n").expect("write");
    fs::set_permissions(src.join("secret.txt"), fs::Permissions::from_mode(0o000)).expect("chmod");
    fs::set_permissions(src.join("locked-dir"), fs::Permissions::from_mode(0o000)).expect("chmod");
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cert = pki.agent("web-01");
    for f in ["ca.crt", "web-01.crt", "web-01.key"] {
        fs::set_permissions(pki.dir.join(f), fs::Permissions::from_mode(0o644)).expect("chmod for nobody");
    }
    let yaml = agent_yaml(&pki, "web-01", &cert, server.addr, &[entry("etc", "main", &[&src])], "");
    let cfg_path = tmp.path().join("agent.yaml");
    fs::write(&cfg_path, yaml).expect("write");
    fs::set_permissions(&cfg_path, fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nbackup"));
    cmd.args(["backup", "--json", "--config"]).arg(&cfg_path);
    if nbackup_daemon::restore::running_as_root() {
        // Root reads everything; run the agent as an unprivileged user instead.
        cmd.uid(65534).gid(65534);
    }
    let o = cmd.output().await.expect("agent runs");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let skipped = v["skipped"].as_array().expect("skipped list");
    let reason = |name: &str| {
        skipped
            .iter()
            .find(|s| s["path"].as_str().is_some_and(|p| p.ends_with(name)))
            .unwrap_or_else(|| panic!("{name} not reported: {v}"))["reason"]
            .as_str()
            .expect("reason")
            .to_string()
    };
    assert!(reason("secret.txt").contains("Permission denied"), "{}", reason("secret.txt"));
    assert!(reason("locked-dir").contains("Permission denied"), "{}", reason("locked-dir"));
    let restored = tmp.path().join("restored");
    gnu_extract(&server.archives("main", "web-01", "etc")[0], &restored);
    let base = restored.join(src.strip_prefix("/").expect("abs"));
    assert_eq!(fs::read(base.join("readable.txt")).expect("kept"), b"fine\n");
    assert!(!base.join("secret.txt").exists());
    server.stop().await;
}

#[test]
fn the_demo_backs_up_verifies_and_restores() {
    let o = run(nbackup().arg("demo"));
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    let out = text(&o.stdout);
    for step in ["backup    committed", "verify    sha256", "restore   ", "compare   restore equals the source"] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
}

#[test]
fn man_pages_and_completions_are_up_to_date() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let o = run(nbackup().arg("man").arg(tmp.path()));
    assert!(o.status.success());
    let checked_in = repo().join("man");
    let mut generated: Vec<String> = fs::read_dir(tmp.path())
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    generated.sort();
    for name in &generated {
        let fresh = fs::read(tmp.path().join(name)).expect("generated");
        let old = fs::read(checked_in.join(name)).unwrap_or_default();
        assert!(fresh == old, "man/{name} is stale: run `cargo run -- man man/`");
    }
    let stale: Vec<_> = fs::read_dir(&checked_in)
        .expect("man/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !generated.contains(n))
        .collect();
    assert!(stale.is_empty(), "man/ has pages for commands that no longer exist: {stale:?}");
    for (shell, file) in [("bash", "nbackup.bash"), ("zsh", "_nbackup"), ("fish", "nbackup.fish")] {
        let o = run(nbackup().args(["completions", shell]));
        assert!(o.status.success());
        let old = fs::read(repo().join("completions").join(file)).unwrap_or_default();
        assert!(
            o.stdout == old,
            "completions/{file} is stale: run `cargo run -- completions {shell} > completions/{file}`"
        );
    }
}

/// docs/troubleshooting.md is keyed by messages: each heading's backticked text
/// must still be printed by the program.
#[test]
fn every_troubleshooting_heading_is_a_message_the_program_prints() {
    fn sources(dir: &Path, out: &mut String) {
        for e in fs::read_dir(dir).expect("dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push_str(&fs::read_to_string(&p).expect("source"));
            }
        }
    }
    let mut code = String::new();
    for dir in ["src", "daemon/src", "protocol/src", "tui/src"] {
        sources(&repo().join(dir), &mut code);
    }
    let page = fs::read_to_string(repo().join("docs/troubleshooting.md")).expect("page");
    let mut checked = 0;
    for heading in page.lines().filter_map(|l| l.strip_prefix("### ")) {
        for message in heading.split('`').skip(1).step_by(2) {
            assert!(code.contains(message), "docs/troubleshooting.md: {message:?} is not printed anywhere");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} messages");
}
