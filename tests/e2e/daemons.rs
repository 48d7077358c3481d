//! The daemons: schedules, skip-while-running, catch-up, reload, shutdown, the
//! control channel, the admin API (and its permissions), `nbackup ctl`, persistence.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use nbackup_daemon::agent::daemon::{self as agentd, Clock, FastClock, SystemClock};
use nbackup_protocol::admin::{
    ActionResult, AgentInfo, AgentStatus, ArchiveInfo, EntryStatus, Event, EventKind, Freshness, HistoryRecord,
    ServerStatus, SessionInfo, WatchItem,
};
use nbackup_protocol::config::{AgentConfig, Excludes, ServerConfig};
use nbackup_tui::client::{AdminClient, ClientError, Watched};

use crate::proxy::{Fault, Proxy};
use crate::support::*;

struct ServerDaemon {
    addr: SocketAddr,
    socket: PathBuf,
    client: AdminClient,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl ServerDaemon {
    async fn start(root: &Path, pki: &Pki, storages: &[StorageSpec]) -> ServerDaemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        Self::start_on(root, pki, storages, listener, addr).await
    }

    async fn start_on(
        root: &Path,
        pki: &Pki,
        storages: &[StorageSpec],
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
    ) -> ServerDaemon {
        Self::start_with(root, pki, storages, listener, addr, "").await
    }

    /// With `extra` YAML in the `server:` section.
    async fn start_with(
        root: &Path,
        pki: &Pki,
        storages: &[StorageSpec],
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
        extra: &str,
    ) -> ServerDaemon {
        let yaml = server_yaml(root, pki, addr, storages, extra);
        Self::start_yaml(root, listener, addr, &yaml).await
    }

    /// With a whole server YAML.
    async fn start_yaml(root: &Path, listener: tokio::net::TcpListener, addr: SocketAddr, yaml: &str) -> ServerDaemon {
        let yaml = yaml.to_string();
        let path = root.join("server.yaml");
        fs::write(&path, &yaml).expect("server.yaml");
        let config = ServerConfig::parse(&yaml, &path).expect("config");
        let socket = root.join("server.sock");
        let shutdown = CancellationToken::new();
        let (ready, ready_rx) = tokio::sync::oneshot::channel();
        let options = nbackup_daemon::server::Options {
            config_path: Some(path),
            admin: true,
            persist_state: true,
            reload: None,
            ready: Some(ready),
        };
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            nbackup_daemon::server::run_with(config, listener, token, options).await.expect("server runs");
        });
        ready_rx.await.expect("server ready");
        wait_for_socket(&socket).await;
        ServerDaemon { addr, client: AdminClient::new(&socket), socket, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("server task");
    }
}

async fn wait_for_socket(path: &Path) {
    let start = Instant::now();
    while tokio::net::UnixStream::connect(path).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(10), "{} never came up", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct AgentDaemon {
    config: PathBuf,
    client: AdminClient,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Agent YAML with admin socket and state under `root`; `backups` is the raw
/// `backups:` list.
fn agent_daemon_yaml(pki: &Pki, addr: SocketAddr, root: &Path, backups: &str, extra: &str) -> String {
    format!(
        "agent:\n  name: web-01\nserver:\n  address: \"{addr}\"\ntls:\n  ca_cert: {pki}/ca.crt\n  client_cert: {pki}/web-01.crt\n  client_key: {pki}/web-01.key\n\
         state_dir: {root}/agent-state\nadmin:\n  socket: {root}/agent.sock\n\
         retry:\n  max_attempts: 2\n  initial_delay: 100ms\n  max_delay: 500ms\n\
         backups:\n{backups}{extra}",
        pki = pki.dir.display(),
        root = root.display()
    )
}

impl AgentDaemon {
    async fn start(root: &Path, yaml: &str, clock: Arc<dyn Clock>) -> AgentDaemon {
        let path = root.join("agent.yaml");
        fs::write(&path, yaml).expect("agent.yaml");
        let config = AgentConfig::parse(yaml, &path).expect("agent config");
        let shutdown = CancellationToken::new();
        let (ready, ready_rx) = tokio::sync::oneshot::channel();
        let options = agentd::Options {
            daemon: nbackup_daemon::daemon::DaemonOptions {
                config_path: Some(path.clone()),
                admin: true,
                persist_state: true,
                reload: None,
                ready: Some(ready),
            },
            clock,
        };
        let token = shutdown.clone();
        let task = tokio::spawn(async move { agentd::run(config, token, options).await.expect("agent runs") });
        ready_rx.await.expect("agent ready");
        let socket = root.join("agent.sock");
        wait_for_socket(&socket).await;
        AgentDaemon { config: path, client: AdminClient::new(&socket), shutdown, task }
    }

    async fn entry(&self, name: &str) -> EntryStatus {
        self.client.get(&format!("/v1/entries/{name}")).await.expect("entry")
    }

    /// Waits until `entry` has a last result, and returns it.
    async fn wait_result(&self, name: &str, within: Duration) -> nbackup_protocol::admin::EntryResult {
        let start = Instant::now();
        loop {
            let e = self.entry(name).await;
            if let (Some(last), false) = (e.last, e.running) {
                return last;
            }
            assert!(start.elapsed() < within, "{name} produced no result within {within:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("agent stops in time").expect("task");
    }
}

fn entry_yaml(name: &str, src: &Path, extra: &str) -> String {
    format!("  - name: {name}\n    storage: main\n    sources:\n      - path: {}\n{extra}", src.display())
}

async fn events(client: &AdminClient) -> Vec<Event> {
    client.get("/v1/events?since=0&limit=10000").await.expect("events")
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).expect("time").with_timezone(&Utc)
}

#[tokio::test]
async fn a_scheduled_run_fires_at_its_time_in_its_time_zone() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 51);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    // 01:59:40 in Lisbon in winter is 01:59:40 UTC; the clock runs 20× fast, so
    // 02:00 arrives after one real second.
    let clock = Arc::new(FastClock::new(utc("2026-11-22T01:59:40Z"), 20.0));
    let backups = entry_yaml("nightly", &src, "    schedule: \"0 2 * * *\"\n    timezone: Europe/Lisbon\n");
    let agent =
        AgentDaemon::start(tmp.path(), &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""), clock).await;
    let before = agent.entry("nightly").await;
    assert_eq!(before.next_run.as_deref(), Some("2026-11-22T02:00:00Z"));
    assert!(before.last.is_none(), "nothing ran before the time");
    let last = agent.wait_result("nightly", Duration::from_secs(30)).await;
    assert!(last.ok, "{last:?}");
    let after = agent.entry("nightly").await;
    assert_eq!(after.next_run.as_deref(), Some("2026-11-23T02:00:00Z"), "tomorrow's run is next");
    let archives = fs::read_dir(tmp.path().join("storage/main/web-01/nightly")).expect("entry dir").count();
    assert_eq!(archives, 3, "one archive, its manifest and its catalog");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_trigger_while_the_entry_runs_is_skipped_and_recorded() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(3 << 20, 61)).expect("noise");
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    // A slow entry: 3 MiB at 1 MiB/s.
    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 1mb\n");
    let agent = AgentDaemon::start(
        tmp.path(),
        &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""),
        Arc::new(SystemClock),
    )
    .await;
    let r: ActionResult = agent.client.post::<_, ()>("/v1/entries/slow/run", None).await.expect("run");
    assert!(r.ok);
    match agent.client.post::<ActionResult, ()>("/v1/entries/slow/run", None).await {
        Err(ClientError::Api { status: 409, message }) => assert!(message.contains("already running"), "{message}"),
        other => panic!("expected 409, got {other:?}"),
    }
    let skipped: Vec<Event> =
        events(&agent.client).await.into_iter().filter(|e| e.kind.as_str() == "skipped").collect();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert!(skipped[0].message.contains("still running"));
    assert!(agent.wait_result("slow", Duration::from_secs(60)).await.ok);
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn missed_runs_are_caught_up_only_when_asked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 71);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    // The agent last handled yesterday's 02:00 run; it is now 03:00 today.
    let state = tmp.path().join("agent-state");
    fs::create_dir_all(&state).expect("state dir");
    fs::write(
        state.join("agent-state.json"),
        r#"{"entries":{"eager":{"last_fire":"2026-11-21T02:00:00Z"},"lazy":{"last_fire":"2026-11-21T02:00:00Z"}}}"#,
    )
    .expect("state");
    let schedule = "    schedule: \"0 2 * * *\"\n    timezone: UTC\n";
    let backups = format!(
        "{}{}",
        entry_yaml("eager", &src, &format!("{schedule}    catch_up: true\n")),
        entry_yaml("lazy", &src, schedule)
    );
    let clock = Arc::new(FastClock::new(utc("2026-11-22T03:00:00Z"), 1.0));
    let agent =
        AgentDaemon::start(tmp.path(), &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""), clock).await;
    assert!(agent.wait_result("eager", Duration::from_secs(30)).await.ok, "the missed run was replayed");
    let lazy = agent.entry("lazy").await;
    assert!(lazy.last.is_none() && !lazy.running, "catch_up off: not replayed");
    assert_eq!(lazy.next_run.as_deref(), Some("2026-11-23T02:00:00Z"));
    let missed: Vec<Event> = events(&agent.client).await.into_iter().filter(|e| e.kind.as_str() == "missed").collect();
    assert_eq!(missed.len(), 1);
    assert_eq!(missed[0].backup.as_deref(), Some("lazy"));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn reload_keeps_running_backups_and_rejects_an_invalid_config() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(3 << 20, 81)).expect("noise");
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 1mb\n");
    let yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, "");
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;
    agent.client.post::<ActionResult, ()>("/v1/entries/slow/run", None).await.expect("run");

    // An invalid config mid-backup: rejected with the reason, old one kept.
    fs::write(&agent.config, yaml.replace("bandwidth_limit", "bandwith_limit")).expect("write");
    match agent.client.post::<ActionResult, ()>("/v1/reload", None).await {
        Err(ClientError::Api { status: 422, message }) => {
            assert!(message.contains("did you mean `bandwidth_limit`?"), "{message}")
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // A valid one with a new entry: accepted; the running backup is not disturbed.
    let more = format!("{backups}{}", entry_yaml("extra", &src, ""));
    fs::write(&agent.config, agent_daemon_yaml(&pki, server.addr, tmp.path(), &more, "")).expect("write");
    let r: ActionResult = agent.client.post::<_, ()>("/v1/reload", None).await.expect("reload");
    assert!(r.message.contains("2 entries"), "{}", r.message);
    let entries: Vec<EntryStatus> = agent.client.get("/v1/entries").await.expect("entries");
    assert_eq!(entries.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["slow", "extra"]);
    assert!(entries[0].running, "still running after both reloads");
    assert!(agent.wait_result("slow", Duration::from_secs(60)).await.ok);
    let kinds: Vec<String> = events(&agent.client).await.into_iter().map(|e| e.kind.to_string()).collect();
    assert!(kinds.contains(&"reload_failed".to_string()) && kinds.contains(&"reloaded".to_string()), "{kinds:?}");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn stopping_the_agent_mid_backup_aborts_the_session_on_the_server_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(8 << 20, 91)).expect("noise");
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 1mb\n");
    let agent = AgentDaemon::start(
        tmp.path(),
        &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""),
        Arc::new(SystemClock),
    )
    .await;
    agent.client.post::<ActionResult, ()>("/v1/entries/slow/run", None).await.expect("run");
    loop {
        let s: Vec<SessionInfo> = server.client.get("/v1/sessions").await.expect("sessions");
        if s.first().is_some_and(|s| s.bytes_received > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stopping = Instant::now();
    agent.stop().await; // what SIGTERM does
    assert!(stopping.elapsed() < Duration::from_secs(10), "bounded shutdown: {:?}", stopping.elapsed());
    // The agent sent Abort before it exited; the server records it as soon as it
    // reads it — well before any stream timeout (minutes) could have fired.
    let history = loop {
        let history: Vec<HistoryRecord> = server.client.get("/v1/history").await.expect("history");
        if !history.is_empty() {
            break history;
        }
        assert!(stopping.elapsed() < Duration::from_secs(15), "the server never learned of the abort");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome.as_str(), "aborted", "{:?}", history[0]);
    assert!(history[0].message.contains("cancelled"), "{:?}", history[0]);
    let sessions: Vec<SessionInfo> = server.client.get("/v1/sessions").await.expect("sessions");
    assert!(sessions.is_empty());
    // The upload is discarded on a blocking thread after the outcome is recorded.
    while !leftovers(&tmp.path().join("storage/main")).is_empty() {
        assert!(stopping.elapsed() < Duration::from_secs(15), "the aborted upload was never removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn backups_run_with_the_control_channel_down() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "2M", 101);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let proxy = Proxy::start(server.addr).await;
    // The control channel connects first and is cut at once; it retries only in an
    // hour. The backup's own connections go through.
    proxy.fault(0, Fault::CutAfter(0));
    let extra = "daemon:\n  control_channel:\n    reconnect_delay: 1h\n    max_reconnect_delay: 1h\n";
    let backups = entry_yaml("data", &src, "");
    let agent = AgentDaemon::start(
        tmp.path(),
        &agent_daemon_yaml(&pki, proxy.addr, tmp.path(), &backups, extra),
        Arc::new(SystemClock),
    )
    .await;
    agent.client.post::<ActionResult, ()>("/v1/entries/data/run", None).await.expect("run");
    assert!(agent.wait_result("data", Duration::from_secs(30)).await.ok);
    let status: AgentStatus = agent.client.get("/v1/status").await.expect("status");
    assert!(status.control_channel.enabled && !status.control_channel.connected);
    let restored = tmp.path().join("restored");
    let archive = fs::read_dir(tmp.path().join("storage/main/web-01/data"))
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| is_archive(p))
        .expect("archive");
    gnu_extract(&archive, &restored);
    assert_restored(&[src], &Excludes::none(), &restored);
    agent.stop().await;
    server.stop().await;
}

/// Runs `nbackup ctl` without blocking the runtime the daemons under test live on.
async fn ctl(args: &[&str]) -> std::process::Output {
    ctl_as(args, None).await
}

async fn ctl_as(args: &[&str], user: Option<(u32, u32)>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nbackup"));
    cmd.arg("ctl").args(args);
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd.output().await.expect("ctl runs")
}

#[tokio::test]
async fn operator_commands_round_trip_through_ctl_the_server_and_the_agent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 111);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let backups = entry_yaml("data", &src, "    schedule: \"0 4 * * *\"\n");
    let extra = "daemon:\n  control_channel:\n    keepalive_interval: 200ms\n";
    let agent = AgentDaemon::start(
        tmp.path(),
        &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, extra),
        Arc::new(SystemClock),
    )
    .await;
    let (ssock, asock) = (server.socket.display().to_string(), tmp.path().join("agent.sock").display().to_string());
    // Wait for the control channel.
    let start = Instant::now();
    loop {
        let agents: Vec<AgentInfo> = server.client.get("/v1/agents").await.expect("agents");
        if agents.iter().any(|a| a.connected) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "control channel never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Operator → server → control channel → agent.
    let o = ctl(&["--socket", &ssock, "run", "web-01/data"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("data started"));
    assert!(agent.wait_result("data", Duration::from_secs(30)).await.ok);
    // Defer through the server; the agent's next run moves.
    let o = ctl(&["--socket", &ssock, "defer", "web-01/data", "--seconds", "172800"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let e = agent.entry("data").await;
    let next = utc(e.next_run.as_deref().expect("next run"));
    assert!(next - Utc::now() > chrono::Duration::hours(47), "deferred two days: {next}");
    // Tables and JSON from both daemons.
    let o = ctl(&["--socket", &ssock, "history", "--json"]).await;
    let h: Vec<HistoryRecord> = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(h[0].outcome.as_str(), "committed");
    let o = ctl(&["--socket", &asock, "entries"]).await;
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ENTRY") && out.contains("0 4 * * *"), "{out}");
    let o = ctl(&["--socket", &ssock, "agents", "--json"]).await;
    let a: Vec<AgentInfo> = serde_json::from_slice(&o.stdout).expect("json");
    assert!(a[0].connected && a[0].rtt_ms.is_some() && a[0].last_results.iter().any(|r| r.ok), "{a:?}");
    // Abort through the server reaches the agent, which says there is nothing to abort.
    let o = ctl(&["--socket", &ssock, "abort", "web-01/data", "--reason", "test"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("data is not running"), "{o:?}");
    // Every error is JSON, axum's own rejections and unknown paths included.
    for (path, status, text) in [
        ("/v1/agents/web-01/entries/data/defer", 400, "seconds"),
        ("/v1/sessions/xyz/streams/notanumber/rotate", 400, "notanumber"),
        ("/v1/nope", 404, "no such endpoint"),
    ] {
        match server.client.post::<ActionResult, ()>(path, None).await {
            Err(ClientError::Api { status: s, message }) => {
                assert_eq!(s, status, "{path}: {message}");
                assert!(message.contains(text), "{path}: {message}");
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    // Exit codes: not found (1), wrong daemon (2), unreachable (3).
    assert_eq!(ctl(&["--socket", &ssock, "rotate", &"0".repeat(32), "0"]).await.status.code(), Some(1));
    assert_eq!(ctl(&["--socket", &asock, "sessions"]).await.status.code(), Some(2));
    assert_eq!(ctl(&["--socket", "/nonexistent/x.sock", "status"]).await.status.code(), Some(3));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn rotate_and_abort_act_on_a_running_session() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(16 << 20, 121)).expect("noise");
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 2mb\n");
    let agent = AgentDaemon::start(
        tmp.path(),
        &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""),
        Arc::new(SystemClock),
    )
    .await;
    agent.client.post::<ActionResult, ()>("/v1/entries/slow/run", None).await.expect("run");
    let session = loop {
        let s: Vec<SessionInfo> = server.client.get("/v1/sessions").await.expect("sessions");
        if let Some(s) = s.into_iter().find(|s| s.bytes_received > 0 && !s.streams.is_empty()) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let r: ActionResult = server
        .client
        .post::<_, ()>(&format!("/v1/sessions/{}/streams/0/rotate", session.id), None)
        .await
        .expect("rotate");
    assert!(r.ok);
    // The agent re-joins stream 0 and carries on.
    let start = Instant::now();
    loop {
        let s: SessionInfo = server.client.get(&format!("/v1/sessions/{}", session.id)).await.expect("session");
        if s.streams.iter().any(|st| st.reconnects >= 1) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "stream never re-joined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The agent's view of the same stream...
    let status: AgentStatus = agent.client.get("/v1/status").await.expect("status");
    let run = &status.running[0];
    assert_eq!(run.session.as_deref(), Some(session.id.as_str()));
    let row = &run.stream_table[0];
    assert!(row.reconnects >= 1 && row.rtt_ms.is_some() && row.bytes_sent > 0, "{row:?}");
    // ...and, through the control channel, the agent's numbers in the server's table.
    let start = Instant::now();
    loop {
        let s: SessionInfo = server.client.get(&format!("/v1/sessions/{}", session.id)).await.expect("session");
        if s.eta_secs.is_some() && s.streams.iter().any(|st| st.rtt_ms.is_some()) {
            assert_eq!(s.estimate_bytes, Some(16 << 20), "the pre-scan's total");
            assert!(s.streams.iter().all(|st| ["receiving", "idle", "closed"].contains(&st.state.as_str())));
            break;
        }
        let agents: Vec<AgentInfo> = server.client.get("/v1/agents").await.expect("agents");
        assert!(start.elapsed() < Duration::from_secs(5), "no agent report reached the server: {s:?} {agents:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = nbackup_protocol::admin::AbortRequest { reason: Some("maintenance".into()) };
    let r: ActionResult =
        server.client.post(&format!("/v1/sessions/{}/abort", session.id), Some(&body)).await.expect("abort");
    assert!(r.ok);
    let last = agent.wait_result("slow", Duration::from_secs(30)).await;
    assert!(!last.ok);
    assert!(last.error.as_deref().is_some_and(|e| e.contains("aborted by the operator: maintenance")), "{last:?}");
    let history: Vec<HistoryRecord> = server.client.get("/v1/history").await.expect("history");
    assert_eq!(history[0].outcome.as_str(), "aborted");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_admin_socket_refuses_other_users() {
    if !nbackup_daemon::restore::running_as_root() {
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let mode = fs::metadata(&server.socket).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    let socket = server.socket.display().to_string();
    let nobody = Some((65534, 65534));
    // The file mode already keeps others out.
    assert_eq!(
        ctl_as(&["--socket", &socket, "status"], nobody).await.status.code(),
        Some(3),
        "0660 socket: connect refused"
    );
    // Even with a careless mode, the peer-credential check refuses them.
    fs::set_permissions(&server.socket, fs::Permissions::from_mode(0o666)).expect("chmod");
    let o = ctl_as(&["--socket", &socket, "status"], nobody).await;
    assert_eq!(o.status.code(), Some(4), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("access denied"));
    // Root is served.
    let s: ServerStatus = server.client.get("/v1/status").await.expect("root is allowed");
    assert_eq!(s.version, nbackup_daemon::VERSION);
    server.stop().await;
}

#[tokio::test]
async fn members_of_the_admin_group_are_served() {
    if !nbackup_daemon::restore::running_as_root() || nbackup_daemon::admin::group_id("nogroup").is_none() {
        eprintln!("skipped: needs root and a `nogroup` group");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 131);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let backups = entry_yaml("data", &src, "");
    let yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, "").replace(
        &format!("admin:\n  socket: {}/agent.sock\n", tmp.path().display()),
        &format!("admin:\n  socket: {}/agent.sock\n  group: nogroup\n", tmp.path().display()),
    );
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;
    let sock = tmp.path().join("agent.sock").display().to_string();
    let o = ctl_as(&["--json", "--socket", &sock, "status"], Some((65534, 65534))).await;
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let s: AgentStatus = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s.agent, "web-01");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn history_and_events_survive_a_server_restart_and_metrics_parse() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 141);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let before: Vec<Event> = server.client.get("/v1/events").await.expect("events");
    let addr = server.addr;
    server.stop().await;

    let listener = tokio::net::TcpListener::bind(addr).await.expect("same port");
    let server = ServerDaemon::start_on(tmp.path(), &pki, &[gzip("main")], listener, addr).await;
    let history: Vec<HistoryRecord> = server.client.get("/v1/history").await.expect("history");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].archive.as_deref(), Some(report.archive.as_str()));
    let after: Vec<Event> = server.client.get("/v1/events").await.expect("events");
    assert!(after.len() > before.len());
    assert_eq!(&after[..before.len()], &before[..], "old events kept, numbering continued");
    assert!(after.windows(2).all(|w| w[1].seq == w[0].seq + 1));

    let text = server.client.get_text("/metrics").await.expect("metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("prometheus text");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    assert_eq!(value("nbackup_sessions_active"), 0.0);
    assert!(value("nbackup_storage_free_bytes") > 0.0);
    let last = value("nbackup_last_success_timestamp_seconds");
    assert!((last - Utc::now().timestamp() as f64).abs() < 600.0, "last success restored from history: {last}");
    assert!(scrape.docs.contains_key("nbackup_backups_committed_total"));
    server.stop().await;
}

#[tokio::test]
async fn watch_streams_snapshots_and_events() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 151);
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let mut watch = server.client.watch().await.expect("watch");
    let first = tokio::time::timeout(Duration::from_secs(5), watch.recv()).await.expect("item").expect("open");
    let Watched::Item(first) = first else { panic!("unreadable: {first:?}") };
    assert!(matches!(*first, WatchItem::ServerSnapshot { .. }), "{first:?}");
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    backup(&cfg, 0).await.expect("backup");
    let start = Instant::now();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), watch.recv()).await.expect("item").expect("open");
        if let Watched::Item(item) = item
            && let WatchItem::Event { event } = *item
            && event.kind.as_str() == "committed"
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    server.stop().await;
}

#[test]
fn agent_status_is_served_as_documented() {
    // The admin types round-trip through JSON as the docs show them.
    let json = r#"{"daemon":"agent","version":"0.1.0","agent":"web-01","uptime_secs":5,"server":"backup:9847",
      "control_channel":{"enabled":true,"connected":true,"rtt_ms":0.4},
      "entries":[{"name":"etc","storage":"main","schedule":"0 2 * * *","timezone":"local","running":false}],
      "running":[]}"#;
    let s: AgentStatus = serde_json::from_str(json).expect("parses");
    assert_eq!(s.entries[0].next_run, None);
}

#[tokio::test]
async fn each_attempt_is_bounded_and_retried() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(4 << 20, 161)).expect("noise");
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    // 4 MiB at 1 MB/s cannot finish in an attempt of 1 s.
    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 1mb\n");
    let yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, "")
        .replace("  max_delay: 500ms\n", "  max_delay: 500ms\n  attempt_timeout: 1s\n");
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;
    agent.client.post::<ActionResult, ()>("/v1/entries/slow/run", None).await.expect("run");
    let last = agent.wait_result("slow", Duration::from_secs(30)).await;
    assert!(!last.ok);
    assert_eq!(last.attempts, 2, "retry.max_attempts: 2 → {last:?}");
    assert!(last.error.as_deref().is_some_and(|e| e.contains("did not finish within 1s")), "{last:?}");
    let retries = events(&agent.client).await.into_iter().filter(|e| e.kind.as_str() == "retry").count();
    assert_eq!(retries, 1);
    // Each timed-out attempt told the server, which freed the entry at once.
    let start = Instant::now();
    let history = loop {
        let h: Vec<HistoryRecord> = server.client.get("/v1/history").await.expect("history");
        if h.len() == 2 {
            break h;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{h:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(history.iter().all(|h| h.outcome.as_str() == "aborted"), "{history:?}");
    assert!(leftovers(&tmp.path().join("storage/main")).is_empty());
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn server_reload_adds_storages_and_certificates_without_dropping_sessions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(3 << 20, 171)).expect("noise");
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 1mb\n");
    let agent = AgentDaemon::start(
        tmp.path(),
        &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""),
        Arc::new(SystemClock),
    )
    .await;
    agent.client.post::<ActionResult, ()>("/v1/entries/slow/run", None).await.expect("run");
    loop {
        let s: Vec<SessionInfo> = server.client.get("/v1/sessions").await.expect("sessions");
        if s.first().is_some_and(|s| s.bytes_received > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = tmp.path().join("server.yaml");
    let storages = [zstd("main"), gzip("second")];
    // A typo: rejected with the reason, the running configuration stays.
    let good = server_yaml(tmp.path(), &pki, server.addr, &storages, "");
    fs::write(&config, good.replace("max_backups", "max_backup")).expect("write");
    match server.client.post::<ActionResult, ()>("/v1/reload", None).await {
        Err(ClientError::Api { status: 422, message }) => assert!(message.contains("max_backups"), "{message}"),
        other => panic!("expected 422, got {other:?}"),
    }
    // A new storage and a renewed server certificate.
    let renewed = nbackup_daemon::pki::issue(&pki.ca, &nbackup_daemon::pki::Leaf::Server(vec!["127.0.0.1".into()]), 5)
        .expect("renewed certificate");
    nbackup_daemon::pki::write_pair(&pki.dir.join("server"), &renewed, true).expect("write");
    fs::write(&config, &good).expect("write");
    let r: ActionResult = server.client.post::<_, ()>("/v1/reload", None).await.expect("reload");
    assert!(r.message.contains("main, second"), "{}", r.message);
    let status: ServerStatus = server.client.get("/v1/status").await.expect("status");
    assert_eq!(status.storages.len(), 2);
    // New connections get the new certificate...
    let tls = raw_tls(server.addr, &pki, Some(&pki.agent("web-01")), false).await.expect("handshake");
    let presented = tls.get_ref().1.peer_certificates().expect("server certificate")[0].clone();
    let on_disk = nbackup_daemon::tls::pem_certs(renewed.cert_pem.as_bytes()).expect("pem")[0].clone();
    assert_eq!(presented, on_disk);
    // ...and the session that was running carries on to commit.
    assert!(agent.wait_result("slow", Duration::from_secs(60)).await.ok);
    let history: Vec<HistoryRecord> = server.client.get("/v1/history").await.expect("history");
    assert_eq!(history[0].outcome.as_str(), "committed", "{history:?}");
    agent.stop().await;
    server.stop().await;
}

/// A daemon run as a child process, the way systemd runs it.
struct DaemonProcess {
    child: tokio::process::Child,
}

impl DaemonProcess {
    /// Starts `nbackup <what> --config <config>` with `NOTIFY_SOCKET` and waits for
    /// `READY=1` on it.
    async fn start(what: &str, config: &Path, root: &Path) -> DaemonProcess {
        let notify = root.join(format!("{what}-notify.sock"));
        let listener = tokio::net::UnixDatagram::bind(&notify).expect("notify socket");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nbackup"))
            .arg(what)
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &notify)
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("daemon starts");
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(20), listener.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what} never sent READY=1"))
            .expect("notify");
        assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
        DaemonProcess { child }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id().expect("running") as i32).expect("pid");
        rustix::process::kill_process(pid, signal).expect("signal");
    }

    async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(rustix::process::Signal::TERM);
        tokio::time::timeout(within, self.child.wait()).await.expect("exits in time").expect("wait")
    }
}

#[tokio::test]
async fn real_signals_readiness_reload_and_a_bounded_sigterm_mid_backup() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let pki = Pki::new(&root.join("pki"));
    let src = root.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(8 << 20, 181)).expect("noise");
    let addr = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    fs::write(root.join("server.yaml"), server_yaml(root, &pki, addr, &[zstd("main")], "")).expect("server.yaml");
    let server = DaemonProcess::start("server", &root.join("server.yaml"), root).await;
    let server_api = AdminClient::new(root.join("server.sock"));

    let backups = entry_yaml("slow", &src, "    bandwidth_limit: 1mb\n");
    let config = root.join("agent.yaml");
    fs::write(&config, agent_daemon_yaml(&pki, addr, root, &backups, "")).expect("agent.yaml");
    let agent = DaemonProcess::start("agent", &config, root).await;
    let agent_api = AdminClient::new(root.join("agent.sock"));

    // SIGHUP re-reads the file.
    let more = format!("{backups}{}", entry_yaml("extra", &src, ""));
    fs::write(&config, agent_daemon_yaml(&pki, addr, root, &more, "")).expect("agent.yaml");
    agent.signal(rustix::process::Signal::HUP);
    let start = Instant::now();
    loop {
        let entries: Vec<EntryStatus> = agent_api.get("/v1/entries").await.expect("entries");
        if entries.len() == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM mid-backup: the agent aborts the session, the server records it, the
    // agent exits cleanly and promptly.
    agent_api.post::<ActionResult, ()>("/v1/entries/slow/run", None).await.expect("run");
    loop {
        let s: Vec<SessionInfo> = server_api.get("/v1/sessions").await.expect("sessions");
        if s.first().is_some_and(|s| s.bytes_received > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = agent.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    let start = Instant::now();
    let history = loop {
        let h: Vec<HistoryRecord> = server_api.get("/v1/history").await.expect("history");
        if !h.is_empty() {
            break h;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the server never learned of the abort");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(history[0].outcome.as_str(), "aborted");
    assert!(history[0].message.contains("cancelled"), "{:?}", history[0]);
    assert!(!root.join("agent.sock").exists(), "the agent removes its socket");

    let status = server.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    assert!(!root.join("server.sock").exists(), "the server removes its socket");
}

#[tokio::test]
async fn the_server_records_every_happening_as_an_event() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(2 << 20, 191)).expect("noise");
    // A storage on a nearly full filesystem, when this test may mount one.
    let small = tmp.path().join("storage/small");
    fs::create_dir_all(&small).expect("mkdir");
    let mounted = Tmpfs::mount(&small, "4m");
    if mounted.is_some() {
        fs::write(small.join("ballast"), vec![0u8; 3900 << 10]).expect("ballast");
    } else {
        eprintln!("disk_low not checked: cannot mount a tmpfs here");
    }
    let mut main = gzip("main");
    main.max_backups = 1;
    let server = ServerDaemon::start(tmp.path(), &pki, &[main, gzip("small")]).await;
    // Stream 0 of the first session is cut mid-upload; the agent re-joins it.
    let proxy = Proxy::start(server.addr).await;
    proxy.fault(0, Fault::CutAfter(1 << 20));
    let tuning = Tuning { attempts: 5, ..Tuning::default() };
    let cfg = agent_config_tuned(&pki, proxy.addr, &[entry("data", "main", &[&src])], &tuning);
    backup(&cfg, 0).await.expect("first backup, resumed");
    backup(&cfg, 0).await.expect("second backup, which rotates the first away");
    let lost = agent_config(&pki, server.addr, &[entry("data", "nowhere", &[&src])]);
    backup(&lost, 0).await.expect_err("unknown storage");

    let wanted = ["started", "stream_lost", "stream_rejoined", "committed", "rotated", "refused"];
    // The machine's own disk may be low too, so main may warn as well: look for small's.
    let small_low = |e: &Event| e.kind.as_str() == "disk_low" && e.message.contains("storage small");
    let start = Instant::now();
    let seen = loop {
        let seen: Vec<Event> = events(&server.client).await;
        let low = mounted.is_none() || seen.iter().any(small_low);
        if low && wanted.iter().all(|k| seen.iter().any(|e| e.kind.as_str() == *k)) {
            break seen;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "missing {wanted:?} in {seen:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused = seen.iter().find(|e| e.kind.as_str() == "refused").expect("refused");
    assert!(refused.message.contains("nowhere"), "{refused:?}");
    let rotated = seen.iter().find(|e| e.kind.as_str() == "rotated").expect("rotated");
    assert_eq!((rotated.agent.as_deref(), rotated.backup.as_deref()), (Some("web-01"), Some("data")));
    server.stop().await;
}

#[tokio::test]
async fn a_silent_server_is_found_on_the_control_channel_and_a_stale_connection_records_no_disconnect() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main")]).await;
    let proxy = Proxy::start(server.addr).await;
    // The control channel's first connection goes silent once it is established and
    // has sent a few pings: no FIN, no RST, nothing either way.
    proxy.fault(0, Fault::FreezeAfter(3000));
    let extra = "daemon:\n  control_channel:\n    keepalive_interval: 200ms\n    reconnect_delay: 50ms\n    max_reconnect_delay: 50ms\n";
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).expect("src");
    let yaml = agent_daemon_yaml(&pki, proxy.addr, tmp.path(), &entry_yaml("data", &src, ""), extra);
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;
    let start = Instant::now();
    while proxy.broken.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "the channel never reached the freeze");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let frozen = Instant::now();
    let lost = loop {
        if let Some(e) = events(&agent.client).await.into_iter().find(|e| e.kind.as_str() == "control_lost") {
            break e;
        }
        assert!(frozen.elapsed() < Duration::from_secs(30), "the agent never noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let noticed = frozen.elapsed();
    assert!(lost.message.contains("no answer"), "{}", lost.message);
    eprintln!("control channel: a silent server noticed {noticed:?} after the freeze (keepalive 200ms)");
    // It reconnects (the proxy's next connection is clean) and stays connected, even
    // after the server gives up on the stale connection (3 keepalives of silence).
    let start = Instant::now();
    loop {
        let status: AgentStatus = agent.client.get("/v1/status").await.expect("status");
        if status.control_channel.connected {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never reconnected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let agents: Vec<nbackup_protocol::admin::AgentInfo> = server.client.get("/v1/agents").await.expect("agents");
    assert!(agents.iter().any(|a| a.name == "web-01" && a.connected), "{agents:?}");
    let ev = events(&server.client).await;
    let last_connect =
        ev.iter().filter(|e| e.kind.as_str() == "agent_connected").map(|e| e.seq).max().expect("connected");
    assert!(
        !ev.iter().any(|e| e.kind.as_str() == "agent_disconnected" && e.seq > last_connect),
        "the replaced connection recorded a disconnect: {ev:?}"
    );
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_admin_api_answers_at_once_while_a_storage_is_frozen_in_a_commit() {
    use nbackup_daemon::fault::{self, Action};
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = ServerDaemon::start(tmp.path(), &pki, &[gzip("main"), gzip("other")]).await;
    let scope = tmp.path().join("storage/main").to_string_lossy().into_owned();
    // Each chunk read back at commit takes 600 ms (about 6 s on two threads);
    // free-space checks hang for 3 s.
    let _verify = fault::inject("commit:verify", scope.clone(), Action::Delay(Duration::from_millis(600)), 0, u32::MAX);
    let _statvfs = fault::inject("statvfs", scope, Action::Delay(Duration::from_secs(3)), 0, u32::MAX);
    let src = noisy_source(tmp.path(), 5);
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let run = tokio::spawn(async move { backup(&cfg, 0).await });
    let start = Instant::now();
    loop {
        let sessions: Vec<SessionInfo> = server.client.get("/v1/sessions").await.expect("sessions");
        if sessions.iter().any(|s| s.phase.as_str() == "committing") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never committing: {sessions:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut slowest = Duration::ZERO;
    for path in ["/v1/status", "/v1/sessions", "/v1/agents", "/metrics", "/v1/history"] {
        let t = Instant::now();
        if path == "/metrics" {
            server.client.get_text(path).await.expect(path);
        } else {
            let _: serde_json::Value = server.client.get(path).await.expect(path);
        }
        slowest = slowest.max(t.elapsed());
    }
    // An abort now is refused: the commit decides.
    let sessions: Vec<SessionInfo> = server.client.get("/v1/sessions").await.expect("sessions");
    let id = &sessions.iter().find(|s| s.phase.as_str() == "committing").expect("committing").id;
    let body = nbackup_protocol::admin::AbortRequest { reason: Some("now".into()) };
    let abort = server.client.post::<ActionResult, _>(&format!("/v1/sessions/{id}/abort"), Some(&body)).await;
    assert!(matches!(&abort, Err(e) if e.to_string().contains("committing")), "{abort:?}");
    assert!(!run.is_finished(), "the commit was still running");
    eprintln!("admin API during a frozen commit: slowest answer {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    run.await.expect("task").expect("the commit finishes");
    let history: Vec<HistoryRecord> = server.client.get("/v1/history").await.expect("history");
    assert_eq!(history.iter().map(|h| h.outcome.as_str()).collect::<Vec<_>>(), ["committed"]);
    server.stop().await;
}

/// An agent state under `root` in which the entry `nightly` (03:00 UTC) has been
/// known for three days and never succeeded; returns its `backups:` YAML.
fn nightly_known_for_three_days(root: &Path, src: &Path) -> String {
    let known = (Utc::now() - chrono::Duration::days(3)).to_rfc3339();
    fs::create_dir_all(root.join("agent-state")).expect("mkdir");
    fs::write(
        root.join("agent-state/agent-state.json"),
        format!(r#"{{"entries":{{"nightly":{{"last":null,"last_fire":null,"known_since":"{known}"}}}}}}"#),
    )
    .expect("state");
    entry_yaml("nightly", src, "    schedule: \"0 3 * * *\"\n    timezone: UTC\n")
}

/// Waits until the server's event log has an event of `kind` about `agent`.
async fn wait_event(client: &AdminClient, kind: EventKind, agent: &str) -> Event {
    let start = Instant::now();
    loop {
        if let Some(e) = events(client).await.into_iter().find(|e| e.kind == kind && e.agent.as_deref() == Some(agent))
        {
            return e;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no {kind} event for {agent}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_server_raises_missed_backups_and_silent_agents_and_remembers_them_across_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 171);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = "  agent_silent_after: 1s\n";
    let server = ServerDaemon::start_with(tmp.path(), &pki, &[gzip("main")], listener, addr, silent).await;
    // An entry the agent has known for three days, scheduled nightly, never done.
    let backups = nightly_known_for_three_days(tmp.path(), &src);
    let yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, "");
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;

    let missed = wait_event(&server.client, EventKind::MissedBackup, "web-01").await;
    assert_eq!(missed.backup.as_deref(), Some("nightly"));
    assert!(
        missed.message.contains("scheduled runs without a success") && missed.message.contains("never"),
        "{missed:?}"
    );
    let agents: Vec<AgentInfo> = server.client.agents().await.expect("agents");
    let nightly = &agents[0].entries[0];
    assert_eq!(nightly.freshness.state, Freshness::Missed, "{nightly:?}");
    assert!(nightly.freshness.missed_runs >= 2, "{nightly:?}");
    let metrics = server.client.metrics().await.expect("metrics");
    assert!(metrics.contains("nbackup_entry_late{agent=\"web-01\",backup=\"nightly\"} 1"), "{metrics}");

    // The host goes away: after agent_silent_after the server says so.
    agent.stop().await;
    let silence = wait_event(&server.client, EventKind::AgentSilent, "web-01").await;
    assert!(silence.message.contains("no control channel since"), "{silence:?}");
    assert!(server.client.agents().await.expect("agents")[0].silent);
    assert!(server.client.metrics().await.expect("m").contains("nbackup_agent_silent{agent=\"web-01\"} 1"));

    // A restart forgets neither the agent nor what was raised.
    server.stop().await;
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let server = ServerDaemon::start_with(tmp.path(), &pki, &[gzip("main")], listener, addr, silent).await;
    let agents = server.client.agents().await.expect("agents");
    assert_eq!(agents.len(), 1, "the agent is known after the restart: {agents:?}");
    assert!(!agents[0].connected && agents[0].silent, "{:?}", agents[0]);
    assert_eq!(agents[0].entries[0].freshness.state, Freshness::Missed);

    // It comes back and the entry commits: recovered, and raised only once.
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;
    agent.client.post::<ActionResult, ()>("/v1/entries/nightly/run", None).await.expect("run");
    assert!(agent.wait_result("nightly", Duration::from_secs(30)).await.ok);
    let recovered = wait_event(&server.client, EventKind::BackupRecovered, "web-01").await;
    assert_eq!(recovered.backup.as_deref(), Some("nightly"));
    let all = events(&server.client).await;
    let count = |k: EventKind| all.iter().filter(|e| e.kind == k).count();
    assert_eq!((count(EventKind::MissedBackup), count(EventKind::AgentSilent)), (1, 1), "raised once each");
    let agents = server.client.agents().await.expect("agents");
    assert!(agents[0].connected && !agents[0].silent);
    assert_eq!(agents[0].entries[0].freshness.state, Freshness::Fresh);
    agent.stop().await;
    server.stop().await;
}

fn ctl_verify(socket: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(["ctl", "--socket"])
        .arg(socket)
        .arg("verify")
        .args(args)
        .output()
        .expect("ctl verify");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_quarantines_a_flipped_byte_and_rotation_keeps_the_good_archives() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "2M", 181);
    let storage = StorageSpec { max_backups: 2, ..gzip("main") };
    let server = ServerDaemon::start(tmp.path(), &pki, &[storage]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let first = backup(&cfg, 0).await.expect("first");
    let second = backup(&cfg, 0).await.expect("second");
    let (code, out) = ctl_verify(&server.socket, &["web-01/etc", "--all", "--wait"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("verified ").count(), 2, "{out}");

    // One flipped byte in the middle of the newest archive.
    let dir = tmp.path().join("storage/main/web-01/etc");
    let path = dir.join(&second.archive);
    let mut bytes = fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&path, &bytes).expect("write");
    let (code, out) = ctl_verify(&server.socket, &["web-01/etc", "--all", "--wait"]);
    assert_eq!(code, Some(1), "a corrupt archive fails the command: {out}");
    assert!(
        out.contains("archive_corrupt") && out.contains(&second.archive) && out.contains("quarantined as"),
        "{out}"
    );
    assert!(out.contains("1 verified, 1 corrupt, 0 not verified"), "{out}");
    let quarantined = dir.join(format!("{}.corrupt", second.archive));
    assert!(quarantined.exists() && dir.join(format!("{}.corrupt.json", second.archive)).exists());
    assert!(!path.exists());
    let listed: Vec<ArchiveInfo> = server.client.get("/v1/archives").await.expect("archives");
    assert_eq!(listed.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(), [first.archive.as_str()]);
    let logged = events(&server.client).await;
    let corrupt = logged.iter().find(|e| e.kind == EventKind::ArchiveCorrupt).expect("an archive_corrupt event");
    assert_eq!(corrupt.kind.level(), nbackup_protocol::admin::Level::Error);

    // Rotation counts only good archives and never touches the quarantined one.
    let third = backup(&cfg, 0).await.expect("third");
    let fourth = backup(&cfg, 0).await.expect("fourth");
    let listed: Vec<ArchiveInfo> = server.client.get("/v1/archives").await.expect("archives");
    assert_eq!(
        listed.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        [third.archive.as_str(), fourth.archive.as_str()],
        "the two newest good archives are kept"
    );
    assert!(quarantined.exists(), "rotation never deletes a quarantined archive");
    // Naming an archive that is not there is refused; naming one verifies just it.
    let none = nbackup_protocol::admin::VerifyRequest { archive: Some("nope.tar.gz".into()), ..Default::default() };
    let refused = server.client.verify(&none).await.expect_err("no such archive");
    assert!(matches!(refused, ClientError::Api { status: 404, .. }), "{refused:?}");
    let one = nbackup_protocol::admin::VerifyRequest { archive: Some(third.archive.clone()), ..Default::default() };
    let started = server.client.verify(&one).await.expect("verify one");
    assert!(started.message.starts_with("verifying 1 archive"), "{}", started.message);
    let start = Instant::now();
    while !events(&server.client)
        .await
        .iter()
        .any(|e| e.kind == EventKind::Verified && e.message.starts_with(&third.archive))
    {
        assert!(start.elapsed() < Duration::from_secs(20), "the named archive was not verified");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A job still running refuses a second one; wait for it to end first.
    while events(&server.client).await.iter().filter(|e| e.kind == EventKind::VerifyDone).count() < 3 {
        assert!(start.elapsed() < Duration::from_secs(20), "the job did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The default is each entry's newest, and a good one exits 0.
    let (code, out) = ctl_verify(&server.socket, &["--wait"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("1 verified, 0 corrupt"), "{out}");
    server.stop().await;
}

/// A local webhook receiver: answers `500` to the first `fail_first` requests and
/// `200` after, and hands each request (path, headers, body) over.
async fn webhook_sink(
    fail_first: usize,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(String, String, String)>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut served = 0usize;
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body) = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, String::from_utf8_lossy(&buf[end + 4..]).into_owned());
                }
            };
            served += 1;
            let status = if served <= fail_first { "500 Internal Server Error" } else { "200 OK" };
            let _ = sock
                .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes())
                .await;
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            let _ = tx.send((path, head, body));
        }
    });
    (addr, rx)
}

async fn next_body(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String, String)>,
) -> (String, serde_json::Value) {
    let (path, _, body) =
        tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("a webhook call").expect("open");
    (path, serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)))
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_and_recoveries_reach_webhooks_and_commands_with_retries() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 191);
    let (sink, mut calls) = webhook_sink(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let envs = tmp.path().join("envs");
    fs::create_dir_all(&envs).expect("mkdir");
    // The URL holds the "token" in a file, as a Slack one would.
    fs::write(tmp.path().join("hook.url"), format!("http://{sink}/hook/SECRET-TOKEN\n")).expect("url file");
    let notify = format!(
        "notify:\n  - name: hook\n    webhook:\n      url_file: hook.url\n    on: [failure, recovery]\n\
         \x20 - name: page\n    command: [/bin/sh, -c, 'env | grep ^NBACKUP_ | sort > {}/$NBACKUP_EVENT']\n",
        envs.display()
    );
    let yaml = server_yaml(tmp.path(), &pki, addr, &[gzip("main")], "") + &notify;
    let server = ServerDaemon::start_yaml(tmp.path(), listener, addr, &yaml).await;
    let backups = nightly_known_for_three_days(tmp.path(), &src);
    let agent_yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, "");
    let agent = AgentDaemon::start(tmp.path(), &agent_yaml, Arc::new(SystemClock)).await;

    // The missed backup: the first call is refused (500) and retried.
    let (path, first) = next_body(&mut calls).await;
    let (_, again) = next_body(&mut calls).await;
    assert_eq!(path, "/hook/SECRET-TOKEN");
    assert_eq!(first, again, "the same message, retried after a 500");
    assert_eq!(first["class"], "failure");
    assert_eq!(first["event"]["kind"], "missed_backup");
    assert_eq!(first["event"]["agent"], "web-01");
    assert!(
        first["summary"].as_str().is_some_and(|s| s.starts_with("FAILURE web-01/nightly missed_backup")),
        "{first}"
    );
    let env_file = envs.join("missed_backup");
    let start = Instant::now();
    while !env_file.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "the command hook never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let env = fs::read_to_string(&env_file).expect("env");
    for want in [
        "NBACKUP_CLASS=failure",
        "NBACKUP_EVENT=missed_backup",
        "NBACKUP_AGENT=web-01",
        "NBACKUP_ENTRY=nightly",
        "NBACKUP_DAEMON=server",
    ] {
        assert!(env.lines().any(|l| l == want), "{want} missing from {env}");
    }

    // A commit is the recovery, told once; successes were not asked for.
    agent.client.post::<ActionResult, ()>("/v1/entries/nightly/run", None).await.expect("run");
    let (_, recovered) = next_body(&mut calls).await;
    assert_eq!(
        (recovered["class"].as_str(), recovered["event"]["kind"].as_str()),
        (Some("recovery"), Some("committed"))
    );
    wait_event(&server.client, EventKind::BackupRecovered, "web-01").await;

    // A test message on demand, and a clear refusal for an unknown target.
    let answer = server.client.notify_test("hook").await.expect("notify-test");
    assert!(answer.message.contains("sent to hook"), "{}", answer.message);
    let (_, test) = next_body(&mut calls).await;
    assert!(test["summary"].as_str().is_some_and(|s| s.starts_with("TEST")), "{test}");
    let unknown = server.client.notify_test("nope").await.expect_err("unknown");
    assert!(matches!(unknown, ClientError::Api { status: 404, .. }), "{unknown:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(2500), calls.recv()).await.is_err(),
        "nothing else was sent (no duplicate recovery, no success)"
    );
    // The secret part of the URL is in no event.
    assert!(!events(&server.client).await.iter().any(|e| e.message.contains("SECRET-TOKEN")));
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn failures_and_recoveries_reach_an_smtp_relay_over_starttls_with_a_login() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 193);
    // The relay refuses the first message (451): the daemon retries.
    let (relay, mut mails) = crate::smtp::start(&pki.dir, 1).await;
    fs::write(tmp.path().join("smtp.pass"), "s3cret-pass\n").expect("password file");
    let notify = format!(
        "notify:\n  - name: ops-mail\n    email:\n      server: \"127.0.0.1:{}\"\n      tls: starttls\n\
         \x20     from: \"nbackup <backup@example.com>\"\n      to: [ops@example.com, oncall@example.com]\n\
         \x20     username: backup@example.com\n      password_file: smtp.pass\n      ca_file: {}/ca.crt\n",
        relay.port(),
        pki.dir.display()
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let yaml = server_yaml(tmp.path(), &pki, addr, &[gzip("main")], "") + &notify;
    let server = ServerDaemon::start_yaml(tmp.path(), listener, addr, &yaml).await;
    let backups = nightly_known_for_three_days(tmp.path(), &src);
    let agent_yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, "");
    let agent = AgentDaemon::start(tmp.path(), &agent_yaml, Arc::new(SystemClock)).await;

    let missed = next_mail(&mut mails).await;
    assert!(missed.tls, "sent after STARTTLS");
    assert_eq!(missed.login.as_deref(), Some("backup@example.com:s3cret-pass"));
    assert_eq!(missed.from, "<backup@example.com>");
    assert_eq!(missed.to, ["<ops@example.com>", "<oncall@example.com>"]);
    assert!(missed.data.contains("Subject: [nbackup] FAILURE web-01/nightly missed_backup"), "{}", missed.data);
    assert!(missed.data.contains("event    missed_backup"), "{}", missed.data);
    assert!(missed.data.contains("agent    web-01"), "{}", missed.data);

    agent.client.post::<ActionResult, ()>("/v1/entries/nightly/run", None).await.expect("run");
    let recovered = next_mail(&mut mails).await;
    assert!(recovered.data.contains("Subject: [nbackup] RECOVERED web-01/nightly committed"), "{}", recovered.data);

    let answer = server.client.notify_test("ops-mail").await.expect("notify-test");
    assert!(answer.message.contains("sent to ops-mail"), "{}", answer.message);
    assert!(next_mail(&mut mails).await.data.contains("Subject: [nbackup] TEST"));
    assert!(!events(&server.client).await.iter().any(|e| e.message.contains("s3cret")), "no password in events");
    agent.stop().await;
    server.stop().await;
}

async fn next_mail(mails: &mut tokio::sync::mpsc::UnboundedReceiver<crate::smtp::Mail>) -> crate::smtp::Mail {
    tokio::time::timeout(Duration::from_secs(30), mails.recv()).await.expect("a mail").expect("relay runs")
}

#[tokio::test]
async fn a_scheduled_restore_test_restores_files_of_the_newest_archive_and_records_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "300K", 197);
    let server = ServerDaemon::start(tmp.path(), &pki, &[zstd("main")]).await;
    // Every minute of a clock running 30× fast: a test every 2 s.
    let clock = Arc::new(FastClock::new(utc("2026-11-22T05:59:00Z"), 30.0));
    let backups = entry_yaml("etc", &src, "    restore_test:\n      schedule: \"* * * * *\"\n      files: 5\n");
    let agent =
        AgentDaemon::start(tmp.path(), &agent_daemon_yaml(&pki, server.addr, tmp.path(), &backups, ""), clock).await;
    agent.client.post::<ActionResult, ()>("/v1/entries/etc/run", None).await.expect("run");
    assert!(agent.wait_result("etc", Duration::from_secs(30)).await.ok);
    let start = Instant::now();
    let tested = loop {
        let found = events(&agent.client).await.into_iter().find(|e| e.kind == EventKind::RestoreTested);
        if let Some(e) = found {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no restore test: {:?}", events(&agent.client).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(tested.backup.as_deref(), Some("etc"));
    assert!(tested.message.contains("5 files restored, 5 identical to the source"), "{}", tested.message);
    // Nothing is left behind in the state directory.
    let leftovers: Vec<_> = fs::read_dir(tmp.path().join("agent-state"))
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("restore-test-")).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    agent.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_agent_daemon_renews_its_certificate_before_it_ends_and_backs_up_with_the_new_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "1M", 173);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut yaml = server_yaml(tmp.path(), &pki, addr, &[gzip("main")], "");
    yaml.push_str(&format!("enrollment:\n  ca_key: {}\n", pki.dir.join("ca.key").display()));
    let server = ServerDaemon::start_yaml(tmp.path(), listener, addr, &yaml).await;
    let cert = pki.dir.join("web-01.crt");
    let serial = |p: &Path| {
        nbackup_daemon::pki::describe_pem(&fs::read_to_string(p).expect("cert")).expect("pem")[0].serial.clone()
    };
    let before = serial(&cert);
    // The test certificates last 60 days: a 90-day window renews at once.
    let key_line = format!("  client_key: {}/web-01.key\n", pki.dir.display());
    let yaml = agent_daemon_yaml(&pki, server.addr, tmp.path(), &entry_yaml("data", &src, ""), "")
        .replace(&key_line, &format!("{key_line}  renew_before: 90d\n"));
    let agent = AgentDaemon::start(tmp.path(), &yaml, Arc::new(SystemClock)).await;

    let start = Instant::now();
    let renewed = loop {
        if let Some(e) = events(&agent.client).await.into_iter().find(|e| e.kind == EventKind::CertRenewed) {
            break e;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "the agent never renewed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(renewed.message.contains("valid until"), "{renewed:?}");
    assert_ne!(serial(&cert), before, "the certificate file was replaced");
    let signed = wait_event(&server.client, EventKind::CertRenewed, "web-01").await;
    assert!(signed.message.contains(&serial(&cert)), "{signed:?}");
    // Once: the new certificate (365 days) is outside the window.
    let renewals = events(&agent.client).await.into_iter().filter(|e| e.kind == EventKind::CertRenewed).count();
    assert_eq!(renewals, 1);

    // The running daemon uses the new pair: a backup commits, and the server saw
    // the new certificate (the old one is revoked, so only the new one can pass).
    let revoke = nbackup_protocol::admin::RevokeRequest { serial: Some(before), ..Default::default() };
    server.client.revoke(&revoke).await.expect("revoke the old certificate");
    agent.client.run_entry(&nbackup_tui::client::EntryTarget::Own("data".into())).await.expect("run");
    let result = agent.wait_result("data", Duration::from_secs(60)).await;
    assert!(result.ok, "{result:?}");
    let status: nbackup_protocol::admin::AgentStatus = agent.client.get("/v1/status").await.expect("status");
    let mine = status.certificates.iter().find(|c| c.cert == "agent").expect("agent certificate listed");
    assert!(mine.not_after.is_some_and(|t| t > chrono::Utc::now().timestamp() + 59 * 86_400), "{mine:?}");
    // The agent's /metrics says the same, with the entry's last success.
    let text = agent.client.metrics().await.expect("metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("exposition");
    let gauge = |name: &str, label: (&str, &str)| {
        scrape.samples.iter().find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1)).map(|s| {
            match s.value {
                prometheus_parse::Value::Gauge(v) => v,
                _ => f64::NAN,
            }
        })
    };
    let end = gauge("nbackup_cert_expiry_timestamp_seconds", ("cert", "agent")).expect("cert expiry");
    assert_eq!(end as i64, mine.not_after.expect("end"));
    assert!(gauge("nbackup_last_success_timestamp_seconds", ("backup", "data")).is_some_and(|t| t > 0.0), "{text}");
    assert_eq!(gauge("nbackup_entry_running", ("backup", "data")), Some(0.0));
    agent.stop().await;
    server.stop().await;
}
