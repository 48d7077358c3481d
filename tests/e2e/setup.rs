//! `nbackup setup`: an answers file from `--print-answers` round-trips to a server
//! and an agent that back up and restore for real; a re-run edits (diff shown,
//! hand edits kept, no certificate made again); the prompts, driven once in tmux,
//! write a config that loads.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::*;

fn nbackup() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nbackup"))
}

fn run(args: &[&str]) -> Output {
    nbackup().args(args).stdin(Stdio::null()).output().expect("nbackup runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The template with this test's directories and a free loopback port.
fn answers(root: &Path, src: &Path, port: u16) -> serde_yaml::Value {
    let out = run(&["setup", "--print-answers"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut a: serde_yaml::Value = serde_yaml::from_slice(&out.stdout).expect("the template is YAML");
    a["dir"] = s(&root.join("etc")).into();
    a["server"]["listen"] = format!("127.0.0.1:{port}").into();
    a["server"]["names"] = serde_yaml::Value::Sequence(vec!["127.0.0.1".into()]);
    a["server"]["storages"][0]["base_dir"] = s(&root.join("storage/main")).into();
    a["agent"]["backups"][0]["paths"] = serde_yaml::Value::Sequence(vec![s(src).into()]);
    a
}

fn serial(cert: &Path) -> String {
    nbackup_daemon::pki::describe_pem(&fs::read_to_string(cert).expect("cert")).expect("pem")[0].serial.clone()
}

#[test]
fn answers_from_the_template_make_a_server_and_agent_that_back_up_and_restore() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let src = root.join("src");
    fs::create_dir_all(src.join("d")).expect("src");
    fs::write(src.join("d/hello.txt"), b"set up in one command\n").expect("file");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let file = root.join("answers.yaml");
    fs::write(&file, serde_yaml::to_string(&answers(root, &src, port)).expect("yaml")).expect("answers");
    let etc = root.join("etc");

    let dry = run(&["setup", "--answers", s(&file), "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("create a CA") && text(&dry).contains("nothing was changed"), "{}", text(&dry));
    assert!(!etc.exists(), "a dry run writes nothing");

    let out = run(&["setup", "--answers", s(&file)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("started the server here for the check"), "{}", text(&out));
    assert!(text(&out).contains("restored and compared: the chain works"), "{}", text(&out));
    for f in ["server.yaml", "agent.yaml", "pki/ca.crt", "pki/ca.key", "pki/server.crt", "pki/web-01.crt"] {
        assert!(etc.join(f).is_file(), "{f}");
    }
    // The admin socket is the operator's business: moved by hand, kept by re-runs.
    let server_yaml = etc.join("server.yaml");
    let edited = fs::read_to_string(&server_yaml)
        .expect("server.yaml")
        .replace("/run/nbackup/server.sock", s(&root.join("server.sock")));
    fs::write(&server_yaml, edited).expect("hand edit");

    let server = ServerChild::start(&server_yaml, format!("127.0.0.1:{port}").parse().expect("addr"), "");
    let agent_yaml = etc.join("agent.yaml");
    let backup = run(&["backup", "--config", s(&agent_yaml)]);
    assert!(backup.status.success(), "the written agent.yaml backs up: {}", text(&backup));
    let restored = root.join("restored");
    let restore = run(&["restore", "--config", s(&agent_yaml), "--entry", "etc", "--to", s(&restored)]);
    assert!(restore.status.success(), "{}", text(&restore));
    let back = walkdir(&restored).into_iter().find(|p| p.ends_with("d/hello.txt")).expect("restored file");
    assert_eq!(fs::read(back).expect("read"), b"set up in one command\n");

    // A re-run with one answer changed: a diff, the same certificates, the edit kept.
    let before = serial(&etc.join("pki/server.crt"));
    let mut a = answers(root, &src, port);
    a["server"]["storages"][0]["max_backups"] = 9.into();
    fs::write(&file, serde_yaml::to_string(&a).expect("yaml")).expect("answers");
    let again = run(&["setup", "--answers", s(&file)]);
    assert!(again.status.success(), "{}", text(&again));
    let said = text(&again);
    assert!(said.contains("the chain works") && !said.contains("started the server here"), "{said}");
    assert!(said.contains("-    max_backups: 7") && said.contains("+    max_backups: 9"), "{said}");
    assert!(said.contains("agent.yaml is unchanged"), "{said}");
    assert!(!said.contains("create a CA") && !said.contains("issue the"), "{said}");
    assert_eq!(serial(&etc.join("pki/server.crt")), before);
    let now = fs::read_to_string(&server_yaml).expect("server.yaml");
    assert!(now.contains("server.sock") && now.contains(s(&root.join("server.sock"))), "{now}");
    assert!(now.starts_with("# Written by `nbackup setup`"), "the header stays");
    nbackup_protocol::config::ServerConfig::parse(&now, &server_yaml).expect("still loads");
    drop(server);

    // Answers with a typo are refused before anything happens.
    fs::write(&file, "role: server\nsever: {}\n").expect("typo");
    let bad = run(&["setup", "--answers", s(&file)]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("unknown field `sever`"), "{}", text(&bad));
    // Without a terminal and without answers, it says what to do.
    let no_tty = run(&["setup", "--dir", s(&root.join("x"))]);
    assert_eq!(no_tty.status.code(), Some(2));
    assert!(text(&no_tty).contains("--answers"), "{}", text(&no_tty));
}

fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.flatten().flat_map(|e| if e.path().is_dir() { walkdir(&e.path()) } else { vec![e.path()] }).collect()
}

#[test]
fn the_prompts_in_a_terminal_write_a_server_config_that_loads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let etc = tmp.path().join("etc");
    let storage = tmp.path().join("storage/main");
    let command = format!("{} setup --dir {}", env!("CARGO_BIN_EXE_nbackup"), etc.display());
    let tmux = Tmux::start("setup", &command);
    tmux.wait_for("What is this host?");
    tmux.keys(&["Enter"]); // server
    tmux.wait_for("Listen on");
    tmux.keys(&["Enter"]);
    tmux.wait_for("Names agents dial");
    tmux.keys(&["backup.example.com, 10.0.0.5", "Enter"]);
    tmux.wait_for("Sign agents");
    tmux.keys(&["Enter"]);
    tmux.wait_for("Storage name");
    tmux.keys(&["Enter"]); // main
    tmux.wait_for("where its archives go");
    tmux.keys(&["relative/path", "Enter"]);
    tmux.wait_for("not an absolute path");
    tmux.keys(&["BSpace"; 13]);
    tmux.keys(&[s(&storage), "Enter"]);
    tmux.wait_for("will be created");
    tmux.wait_for("archives to keep");
    tmux.keys(&["5", "Enter"]);
    tmux.wait_for("compression");
    tmux.keys(&["Down", "Enter"]); // gzip
    tmux.wait_for("Add another storage");
    tmux.keys(&["Enter"]); // no
    tmux.wait_for("Prove it at the end");
    tmux.keys(&["n", "Enter"]);
    tmux.wait_for("Do this?");
    tmux.keys(&["Enter"]);
    tmux.wait_for("next: systemctl enable --now nbackup-server");
    let server_yaml = etc.join("server.yaml");
    let cfg = nbackup_protocol::config::ServerConfig::parse(
        &fs::read_to_string(&server_yaml).expect("written"),
        &server_yaml,
    )
    .expect("loads");
    let main = cfg.storages.values().next().expect("a storage");
    assert_eq!((main.base_dir.as_path(), main.max_backups), (storage.as_path(), 5));
    assert_eq!(main.compression, nbackup_protocol::wire::Compression::Gzip);
    let names = nbackup_daemon::pki::describe_pem(&fs::read_to_string(etc.join("pki/server.crt")).expect("cert"))
        .expect("pem")[0]
        .names
        .clone();
    assert!(names.contains(&"backup.example.com".to_string()) && names.contains(&"10.0.0.5".to_string()), "{names:?}");
    assert_eq!(cfg.enrollment.and_then(|e| e.address).as_deref(), Some("backup.example.com:9847"));
}
