//! The real console in tmux against real daemons (child processes): a backup
//! appears, progresses and commits; an abort through the console ends a session
//! and is recorded with the operator's uid; the server is killed and restarted
//! and the console reconnects; q and SIGHUP end it. Needs `tmux` (`.ci/run`
//! installs it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbackup_protocol::admin::EventKind;
use nbackup_tui::client::AdminClient;

use crate::support::*;

struct AgentChild(Child);

impl AgentChild {
    fn start(config: &Path, socket: &Path) -> AgentChild {
        let child = Command::new(env!("CARGO_BIN_EXE_nbackup"))
            .args(["agent", "--config"])
            .arg(config)
            .stderr(Stdio::null())
            .spawn()
            .expect("agent starts");
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(start.elapsed() < Duration::from_secs(20), "agent admin socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        AgentChild(child)
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(socket: &Path, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .arg("ctl")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("ctl");
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn console_command(socket: &Path) -> String {
    format!("env TERM=xterm-256color {} console --socket {}", env!("CARGO_BIN_EXE_nbackup"), socket.display())
}

fn setup(tmp: &Path) -> (Pki, PathBuf, std::net::SocketAddr, PathBuf, PathBuf) {
    let pki = Pki::new(&tmp.join("pki"));
    let (server_cfg, addr) = ServerChild::configure(tmp, &pki, &[gzip("main")], "");
    let small = tmp.join("small");
    std::fs::create_dir_all(&small).expect("mkdir");
    std::fs::write(small.join("noise.bin"), noise(2 << 20, 7)).expect("small");
    let big = noisy_source(tmp, 32);
    let entries = [entry("small", "main", &[&small]), entry("big", "main", &[&big])];
    let extra = format!(
        "state_dir: {0}/agent-state\nadmin:\n  socket: {0}/agent.sock\ndaemon:\n  control_channel:\n    keepalive_interval: 1s\n",
        tmp.display()
    );
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), addr, &entries, &extra)
        .replace("    sources:\n", "    bandwidth_limit: 1mb\n    sources:\n");
    let agent_cfg = tmp.join("agent.yaml");
    std::fs::write(&agent_cfg, yaml).expect("agent.yaml");
    (pki, server_cfg, addr, agent_cfg, tmp.join("server.sock"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_follows_a_backup_aborts_a_session_and_survives_a_server_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pki, server_cfg, addr, agent_cfg, server_sock) = setup(tmp.path());
    let mut server = ServerChild::start(&server_cfg, addr, "");
    let agent_sock = tmp.path().join("agent.sock");
    let _agent = AgentChild::start(&agent_cfg, &agent_sock);
    let tmux = Tmux::start("main", &console_command(&server_sock));
    // Connected first, then the first snapshot draws the storages.
    let s = tmux.wait_until("live with storages", |s| s.contains("● live") && s.contains("Storages"));
    assert!(s.contains("1 Overview"), "{s}");
    tmux.wait_for("web-01");

    // A backup appears, progresses and commits.
    ctl(&agent_sock, &["run", "small"]);
    tmux.keys(&["2"]);
    tmux.wait_until("small receiving", |s| s.contains("small") && s.contains("receiving"));
    tmux.keys(&["5"]);
    tmux.wait_until("small committed", |s| s.lines().any(|l| l.contains("small") && l.contains("committed")));

    // An abort through the console ends a session.
    ctl(&agent_sock, &["run", "big"]);
    tmux.keys(&["2"]);
    tmux.wait_until("big receiving", |s| s.contains("big") && s.contains("receiving"));
    tmux.keys(&["a"]);
    let s = tmux.wait_for("Abort session");
    assert!(s.contains("Abort discards") && s.contains("Esc/n back out"), "{s}");
    tmux.keys(&["Escape"]);
    tmux.wait_until("the confirmation closed", |s| !s.contains("Abort session"));
    tmux.keys(&["a"]);
    tmux.wait_for("Abort session");
    tmux.keys(&["Enter"]);
    tmux.wait_for("done:");
    tmux.keys(&["x", "5"]);
    tmux.wait_until("big aborted", |s| s.lines().any(|l| l.contains("big") && l.contains("aborted")));
    let client = AdminClient::new(&server_sock);
    let events = client.events(0, 1000).await.expect("events");
    let uid = rustix::process::geteuid().as_raw();
    let op = events.iter().find(|e| e.kind == EventKind::Operator).expect("the abort is on record");
    assert_eq!(op.actor.as_ref().map(|a| a.uid), Some(uid), "{op:?}");
    assert!(op.message.contains("abort session") && op.message.contains("done"), "{op:?}");

    // The server is killed: the data stays under a banner; it comes back and the
    // console reconnects by itself.
    tmux.keys(&["1"]);
    server.kill9();
    let s = tmux.wait_for("disconnected");
    assert!(s.contains("data") && s.contains("retry in") && s.contains("web-01"), "{s}");
    let _server = ServerChild::start(&server_cfg, addr, "");
    tmux.wait_until("live again", |s| s.contains("● live") && !s.contains("disconnected"));

    // q quits and gives the terminal back (the alternate screen is gone).
    tmux.keys(&["q"]);
    let start = Instant::now();
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(start.elapsed() < Duration::from_secs(10), "the console did not exit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tmux.pane("#{alternate_on}"), "0", "the alternate screen was left");
    assert!(!tmux.screen().contains("Overview"), "the console's screen is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_ssh_session_ends_the_console_and_a_pipe_gets_pointed_to_ctl() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pki, server_cfg, addr, _agent_cfg, server_sock) = setup(tmp.path());
    let _server = ServerChild::start(&server_cfg, addr, "");
    let tmux = Tmux::start("hup", &console_command(&server_sock));
    tmux.wait_for("● live");
    let pid: i32 = tmux.pane("#{pane_pid}").parse().expect("pid");
    // SIGHUP is what the console gets when the SSH connection drops.
    let pid = rustix::process::Pid::from_raw(pid).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("kill");
    let start = Instant::now();
    while tmux.pane("#{pane_dead}") != "1" {
        assert!(start.elapsed() < Duration::from_secs(10), "the console did not exit on SIGHUP");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(tmux.pane("#{alternate_on}"), "0", "the terminal was restored");

    let out = Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(["console", "--socket"])
        .arg(&server_sock)
        .stdin(Stdio::null())
        .output()
        .expect("console");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a terminal") && err.contains("ctl --json"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(["console", "--dump", "--size", "100x30", "--socket"])
        .arg(&server_sock)
        .output()
        .expect("dump");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 Overview") && text.contains("Storages") && text.lines().count() == 30, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_hands_the_terminal_to_a_wizard_and_the_server_reloads_with_its_storage() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_pki, server_cfg, addr, _agent_cfg, server_sock) = setup(tmp.path());
    let _server = ServerChild::start(&server_cfg, addr, "");
    let tmux = Tmux::start("wizard", &console_command(&server_sock));
    tmux.wait_until("live with storages", |s| s.contains("● live") && s.contains("Storages"));
    tmux.keys(&["+"]);
    tmux.wait_for("Add a storage to");
    assert_eq!(tmux.pane("#{alternate_on}"), "0", "the console left its screen to the wizard");
    tmux.wait_for("Storage name");
    tmux.keys(&["usb", "Enter"]);
    tmux.wait_for("where its archives go");
    let dir = tmp.path().join("storage/usb");
    tmux.keys(&[dir.to_str().expect("utf-8"), "Enter"]);
    tmux.wait_for("archives to keep");
    tmux.keys(&["3", "Enter"]);
    tmux.wait_for("compression");
    tmux.keys(&["Enter"]);
    let s = tmux.wait_for("Write it and reload");
    assert!(s.contains("+  usb:") && s.contains("max_backups: 3"), "the diff is shown:\n{s}");
    tmux.keys(&["Enter"]);
    tmux.wait_for("Press Enter to return");
    tmux.keys(&["Enter"]);
    // Back in the console, with the answer and the new storage.
    let s = tmux.wait_until("back with the answer", |s| s.contains("add a storage") && s.contains("reloaded"));
    assert_eq!(tmux.pane("#{alternate_on}"), "1", "the console has its screen again:\n{s}");
    let client = AdminClient::new(&server_sock);
    let status = client.status().await.expect("status");
    let nbackup_tui::client::Status::Server(status) = status else { panic!("a server") };
    assert!(status.storages.iter().any(|st| st.name == "usb"), "{:?}", status.storages);
    let text = std::fs::read_to_string(&server_cfg).expect("config");
    nbackup_protocol::config::ServerConfig::parse(&text, &server_cfg).expect("the edited config loads");
    // Keys reach the console again.
    tmux.keys(&["5"]);
    tmux.wait_for("History");
    tmux.keys(&["q"]);
}
