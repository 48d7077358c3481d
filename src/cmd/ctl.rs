//! `nbackup ctl`: the admin API for people and scripts.

use std::process::ExitCode;

use serde::Serialize;

use nbackup_protocol::admin::{
    ActionResult, AgentInfo, AgentStatus, ArchiveInfo, EntryStatus, HistoryRecord, ServerStatus, SessionInfo,
    VerifyRequest,
};
use nbackup_tui::client::{AdminClient, ArchiveQuery, ClientError, DaemonKind, EntryTarget, Status, discover};

use super::{human_bytes, runtime};
use crate::cli::{CtlArgs, CtlCommand};
use crate::exit::{Exit, fail};

fn exit_for(e: &ClientError) -> Exit {
    match e {
        ClientError::Unreachable { .. } => Exit::Unreachable,
        ClientError::Denied { .. } => Exit::Refused,
        ClientError::Api { .. } | ClientError::Protocol(_) => Exit::Failed,
    }
}

/// A client error as an error carrying its exit code.
pub fn err(e: ClientError) -> anyhow::Error {
    let code = exit_for(&e);
    fail(code, e)
}

/// The client for `--socket`, or for the one daemon running here.
pub async fn client_for(socket: Option<&std::path::Path>) -> anyhow::Result<AdminClient> {
    match socket {
        Some(s) => Ok(AdminClient::new(s)),
        None => {
            // An operator's own defaults, then the packaged daemons' (which run as
            // root or as the nbackup user, and listen in /run/nbackup).
            let mut candidates =
                vec![nbackup_daemon::admin::default_socket("server"), nbackup_daemon::admin::default_socket("agent")];
            for system in ["/run/nbackup/server.sock", "/run/nbackup/agent.sock"] {
                if !candidates.iter().any(|c| c.as_os_str() == system) {
                    candidates.push(system.into());
                }
            }
            discover(&candidates).await.map_err(|e| fail(Exit::Unreachable, anyhow::anyhow!(e)))
        }
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let client = client_for(args.socket.as_deref()).await?;
        let kind = client.kind().await.map_err(err)?;
        dispatch(&client, kind, args.command, args.json).await
    })
}

pub(crate) fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Prints an answer as JSON or through `human`.
fn show<T: Serialize>(v: Result<T, ClientError>, json: bool, human: impl FnOnce(&T)) -> anyhow::Result<()> {
    let v = v.map_err(err)?;
    if json {
        print_json(&v);
    } else {
        human(&v);
    }
    Ok(())
}

fn act(r: Result<ActionResult, ClientError>, json: bool) -> anyhow::Result<()> {
    show(r, json, |r| println!("{}", r.message))
}

fn need(kind: DaemonKind, wanted: DaemonKind, what: &str) -> anyhow::Result<()> {
    if kind == wanted {
        return Ok(());
    }
    Err(fail(Exit::Usage, anyhow::anyhow!("`{what}` needs the {wanted} daemon's socket; pass --socket")))
}

/// `ENTRY` on the agent, `AGENT/ENTRY` on the server.
fn entry_target(kind: DaemonKind, name: &str) -> anyhow::Result<EntryTarget> {
    match (kind, name.split_once('/')) {
        (DaemonKind::Server, Some((agent, entry))) => {
            Ok(EntryTarget::Agent { agent: agent.to_string(), entry: entry.to_string() })
        }
        (DaemonKind::Server, None) => Err(fail(Exit::Usage, anyhow::anyhow!("on the server, name AGENT/ENTRY"))),
        (_, None) => Ok(EntryTarget::Own(name.to_string())),
        (_, Some(_)) => Err(fail(Exit::Usage, anyhow::anyhow!("on the agent, name just the entry"))),
    }
}

async fn dispatch(c: &AdminClient, kind: DaemonKind, command: CtlCommand, json: bool) -> anyhow::Result<ExitCode> {
    use DaemonKind::{Agent, Server};
    match command {
        CtlCommand::Status => show(c.status().await, json, |s| match s {
            Status::Server(s) => print_server_status(s),
            Status::Agent(s) => print_agent_status(s),
        })?,
        CtlCommand::Sessions => {
            need(kind, Server, "sessions")?;
            show(c.sessions().await, json, |v| print_sessions(v))?;
        }
        CtlCommand::Agents => {
            need(kind, Server, "agents")?;
            show(c.agents().await, json, |v| print_agents(v))?;
        }
        CtlCommand::Entries => {
            need(kind, Agent, "entries")?;
            show(c.entries().await, json, |v| print_entries(v))?;
        }
        CtlCommand::History { agent, limit } => {
            need(kind, Server, "history")?;
            show(c.history(agent.as_deref(), limit).await, json, |v| print_history(v))?;
        }
        CtlCommand::Events { since, limit } => show(c.events(since, limit).await, json, |v| {
            for e in v {
                let who = [e.agent.as_deref(), e.backup.as_deref()].into_iter().flatten().collect::<Vec<_>>().join("/");
                println!("{:>6} {} {:<18} {:<16} {}", e.seq, e.time, e.kind.as_str(), who, e.message);
            }
        })?,
        CtlCommand::Archives { agent, backup, storage, buckets } => {
            need(kind, Server, "archives")?;
            let query = ArchiveQuery { agent, backup, storage, buckets };
            show(c.archives(&query).await, json, |v| print_archives(v))?;
        }
        CtlCommand::Abort { target, reason } => {
            let r = match (kind, target.contains('/')) {
                (Server, false) => c.abort_session(&target, reason).await,
                _ => c.abort_entry(&entry_target(kind, &target)?, reason).await,
            };
            act(r, json)?;
        }
        CtlCommand::Rotate { session, stream } => {
            need(kind, Server, "rotate")?;
            act(c.rotate(&session, stream).await, json)?;
        }
        CtlCommand::Run { entry } => act(c.run_entry(&entry_target(kind, &entry)?).await, json)?,
        CtlCommand::Defer { entry, seconds } => {
            act(c.defer_entry(&entry_target(kind, &entry)?, seconds).await, json)?;
        }
        CtlCommand::Reload => act(c.reload().await, json)?,
        CtlCommand::NotifyTest { target } => act(c.notify_test(&target).await, json)?,
        CtlCommand::Sync { storage, bucket } => {
            need(kind, Server, "sync")?;
            act(c.sync(&nbackup_protocol::admin::SyncRequest { storage, bucket }).await, json)?;
        }
        CtlCommand::Verify { target, storage, all, wait } => {
            need(kind, Server, "verify")?;
            let (agent, backup) = match target.as_deref().map(|t| t.split_once('/')) {
                None => (None, None),
                Some(None) => (target, None),
                Some(Some((a, e))) => (Some(a.to_string()), Some(e.to_string())),
            };
            let request = VerifyRequest { storage, agent, backup, all, archive: None };
            if !wait {
                act(c.verify(&request).await, json)?;
                return Ok(Exit::Ok.into());
            }
            return verify_and_wait(c, &request, json).await;
        }
        CtlCommand::Metrics => {
            need(kind, Server, "metrics")?;
            print!("{}", c.metrics().await.map_err(err)?);
        }
    }
    Ok(Exit::Ok.into())
}

/// Starts a verification and follows the watch stream until it is done: one line
/// (or JSON event) per archive; exit 1 if any is corrupt or unverified.
async fn verify_and_wait(c: &AdminClient, request: &VerifyRequest, json: bool) -> anyhow::Result<ExitCode> {
    use nbackup_protocol::admin::{EventKind, WatchItem};
    let mut watch = c.watch().await.map_err(err)?;
    let started = c.verify(request).await.map_err(err)?;
    if !json {
        println!("{}", started.message);
    }
    let mut bad = false;
    while let Some(item) = watch.recv().await {
        let nbackup_tui::client::Watched::Item(item) = item else { continue };
        let WatchItem::Event { event } = *item else { continue };
        let result = matches!(event.kind, EventKind::Verified | EventKind::ArchiveCorrupt | EventKind::VerifyFailed);
        if !(result || event.kind == EventKind::VerifyDone) {
            continue;
        }
        bad |= matches!(event.kind, EventKind::ArchiveCorrupt | EventKind::VerifyFailed);
        if json {
            println!("{}", serde_json::to_string(&event).unwrap_or_default());
        } else {
            let who = [event.agent.as_deref(), event.backup.as_deref()].into_iter().flatten().collect::<Vec<_>>();
            println!("{:<16} {:<24} {}", event.kind.as_str(), who.join("/"), event.message);
        }
        if event.kind == EventKind::VerifyDone {
            return Ok(if bad { Exit::Failed } else { Exit::Ok }.into());
        }
    }
    Err(fail(Exit::Unreachable, anyhow::anyhow!("the daemon closed the watch stream before the verification ended")))
}

fn print_agents(v: &[AgentInfo]) {
    table(
        &["AGENT", "CONNECTED", "ADDRESS", "VERSION", "RTT", "LOAD", "SESSIONS", "LAST SEEN"],
        v.iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    if a.silent { "no (silent)".into() } else { yes(a.connected) },
                    a.address.clone(),
                    a.version.clone(),
                    ms(a.rtt_ms),
                    a.load1.map_or("-".into(), |l| format!("{l:.2}")),
                    a.sessions.len().to_string(),
                    a.last_seen.clone(),
                ]
            })
            .collect(),
    );
    let late: Vec<Vec<String>> = v
        .iter()
        .flat_map(|a| a.entries.iter().map(move |e| (a, e)))
        .filter(|(_, e)| e.freshness.state.is_late())
        .map(|(a, e)| {
            vec![
                format!("{}/{}", a.name, e.name),
                e.freshness.state.to_string(),
                e.freshness.missed_runs.to_string(),
                e.freshness.last_success.clone().unwrap_or_else(|| "never".into()),
            ]
        })
        .collect();
    if !late.is_empty() {
        println!();
        table(&["LATE ENTRY", "STATE", "RUNS", "LAST SUCCESS"], late);
    }
}

fn print_history(v: &[HistoryRecord]) {
    table(
        &["FINISHED", "AGENT", "BACKUP", "OUTCOME", "SIZE", "ARCHIVE / REASON"],
        v.iter()
            .map(|h| {
                vec![
                    h.finished.clone(),
                    h.agent.clone(),
                    h.backup.clone(),
                    h.outcome.to_string(),
                    human_bytes(h.bytes),
                    h.archive.clone().unwrap_or_else(|| h.message.clone()),
                ]
            })
            .collect(),
    );
}

fn print_archives(v: &[ArchiveInfo]) {
    table(
        &["STORAGE", "AGENT", "BACKUP", "ARCHIVE", "SIZE", "MANIFEST", "WHERE"],
        v.iter()
            .map(|a| {
                vec![
                    a.storage.clone(),
                    a.agent.clone(),
                    a.backup.clone(),
                    a.name.clone(),
                    human_bytes(a.size),
                    yes(a.manifest),
                    a.bucket.as_ref().map_or_else(|| "disk".to_string(), |b| format!("bucket {b}")),
                ]
            })
            .collect(),
    );
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Prints left-aligned columns.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    if rows.is_empty() {
        println!("(none)");
    }
    for r in rows {
        line(r);
    }
}

fn print_server_status(s: &ServerStatus) {
    let state = if s.draining { "shutting down" } else { "running" };
    println!("nbackup server {} ({state}), up {}s, listening on {}", s.version, s.uptime_secs, s.listen);
    println!("{} session(s) in progress, {} agent(s) connected", s.active_sessions, s.connected_agents);
    table(
        &["STORAGE", "COMPRESSION", "KEEP", "ARCHIVES", "USED", "FREE", "BASE DIR"],
        s.storages
            .iter()
            .map(|st| {
                vec![
                    st.name.clone(),
                    format!("{} {}", st.compression, st.level),
                    st.max_backups.to_string(),
                    st.archives.to_string(),
                    human_bytes(st.archive_bytes),
                    format!("{} of {}", human_bytes(st.free_bytes), human_bytes(st.total_bytes)),
                    st.base_dir.clone(),
                ]
            })
            .collect(),
    );
    let buckets: Vec<Vec<String>> = s
        .storages
        .iter()
        .flat_map(|st| {
            st.buckets.iter().map(move |b| {
                vec![
                    st.name.clone(),
                    b.name.clone(),
                    format!("{}://{}", b.provider, b.bucket),
                    b.owed.to_string(),
                    b.failing.to_string(),
                    b.oldest_owed_secs.map_or_else(|| "-".to_string(), |s| format!("{s}s")),
                    human_bytes(b.sent_bytes),
                    b.last_error.clone().unwrap_or_default(),
                ]
            })
        })
        .collect();
    if !buckets.is_empty() {
        println!();
        table(&["STORAGE", "BUCKET", "WHERE", "OWED", "FAILING", "OLDEST", "SENT", "LAST ERROR"], buckets);
    }
}

fn print_sessions(v: &[SessionInfo]) {
    table(
        &["SESSION", "AGENT", "BACKUP", "STORAGE", "PHASE", "RECEIVED", "RATE", "ETA", "STREAMS"],
        v.iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    s.agent.clone(),
                    s.backup.clone(),
                    s.storage.clone(),
                    s.phase.to_string(),
                    human_bytes(s.bytes_received),
                    mbps(s.rate_bps),
                    eta(s.eta_secs),
                    s.streams.len().to_string(),
                ]
            })
            .collect(),
    );
    for s in v.iter().filter(|s| !s.streams.is_empty()) {
        println!("\n{} streams:", s.id);
        table(
            &["STREAM", "STATE", "PEER", "BYTES", "RATE", "RTT", "RECONNECTS", "RESENT"],
            s.streams
                .iter()
                .map(|st| {
                    vec![
                        st.stream.to_string(),
                        st.state.to_string(),
                        st.peer.clone(),
                        human_bytes(st.bytes),
                        mbps(st.rate_bps),
                        ms(st.rtt_ms),
                        st.reconnects.to_string(),
                        st.resent_chunks.to_string(),
                    ]
                })
                .collect(),
        );
    }
}

fn mbps(bps: f64) -> String {
    format!("{:.1} MB/s", bps / 1e6)
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |r| format!("{r:.1} ms"))
}

fn eta(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.0}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
    }
}

fn print_agent_status(s: &AgentStatus) {
    let cc = &s.control_channel;
    let control = match (cc.enabled, cc.connected) {
        (false, _) => "disabled".to_string(),
        (true, false) => "not connected".to_string(),
        (true, true) => format!("connected, RTT {}", ms(cc.rtt_ms)),
    };
    println!("nbackup agent {} ({}), up {}s, server {}", s.agent, s.version, s.uptime_secs, s.server);
    println!("control channel: {control}");
    print_entries(&s.entries);
    for r in &s.running {
        println!(
            "\nrunning {} (session {}): attempt {}, {} read at {}, {} sent at {}, {} entries, ETA {}",
            r.entry,
            r.session.as_deref().unwrap_or("-"),
            r.attempt,
            human_bytes(r.bytes_read),
            mbps(r.read_bps),
            human_bytes(r.bytes_acked),
            mbps(r.acked_bps),
            r.entries,
            eta(r.eta_secs),
        );
        table(
            &["STREAM", "STATE", "SENT", "RTT", "ACK", "RECONNECTS", "REQUEUED"],
            r.stream_table
                .iter()
                .map(|st| {
                    vec![
                        st.stream.to_string(),
                        st.state.to_string(),
                        human_bytes(st.bytes_sent),
                        ms(st.rtt_ms),
                        ms(st.ack_ms),
                        st.reconnects.to_string(),
                        st.requeued_chunks.to_string(),
                    ]
                })
                .collect(),
        );
    }
}

fn print_entries(v: &[EntryStatus]) {
    table(
        &["ENTRY", "STORAGE", "SCHEDULE", "NEXT RUN", "RUNNING", "FRESHNESS", "LAST RESULT", "AGE"],
        v.iter()
            .map(|e| {
                let last = e.last.as_ref().map_or("-".to_string(), |l| {
                    if l.ok {
                        format!("ok {}", l.archive.clone().unwrap_or_default())
                    } else {
                        format!("FAILED: {}", l.error.clone().unwrap_or_default())
                    }
                });
                vec![
                    e.name.clone(),
                    e.storage.clone(),
                    e.schedule.clone().map_or("on demand".into(), |s| format!("{s} ({})", e.timezone)),
                    e.next_run.clone().unwrap_or_else(|| "-".into()),
                    yes(e.running),
                    e.freshness.state.to_string(),
                    last,
                    e.last_age_secs.map_or("-".into(), |a| format!("{a}s")),
                ]
            })
            .collect(),
    );
}
