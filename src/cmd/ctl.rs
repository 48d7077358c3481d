//! `nbackup ctl`: the admin API for people and scripts.

use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;

use nbackup_protocol::admin::{
    AbortRequest, ActionResult, AgentInfo, AgentStatus, ArchiveInfo, EntryStatus, Event, HistoryRecord, ServerStatus,
    SessionInfo,
};
use nbackup_tui::client::{AdminClient, ClientError, DaemonKind, discover};

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

fn err(e: ClientError) -> anyhow::Error {
    let code = exit_for(&e);
    fail(code, e)
}

pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let client = match &args.socket {
            Some(s) => AdminClient::new(s),
            None => {
                let candidates =
                    [nbackup_daemon::admin::default_socket("server"), nbackup_daemon::admin::default_socket("agent")];
                discover(&candidates).await.map_err(|e| fail(Exit::Unreachable, anyhow::anyhow!(e)))?
            }
        };
        let kind = client.kind().await.map_err(err)?;
        dispatch(&client, kind, args.command, args.json).await
    })
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn get<T: DeserializeOwned>(c: &AdminClient, path: &str) -> anyhow::Result<T> {
    c.get(path).await.map_err(err)
}

async fn act(c: &AdminClient, path: &str, body: Option<&AbortRequest>, json: bool) -> anyhow::Result<ExitCode> {
    let r: ActionResult = c.post(path, body).await.map_err(err)?;
    if json {
        print_json(&r);
    } else {
        println!("{}", r.message);
    }
    Ok(Exit::Ok.into())
}

fn need(kind: DaemonKind, wanted: DaemonKind, what: &str) -> anyhow::Result<()> {
    if kind == wanted {
        return Ok(());
    }
    let other = if wanted == DaemonKind::Server { "server" } else { "agent" };
    Err(fail(Exit::Usage, anyhow::anyhow!("`{what}` needs the {other} daemon's socket; pass --socket")))
}

/// Query-string encoding for the few values we pass.
fn q(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.@+".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn dispatch(c: &AdminClient, kind: DaemonKind, command: CtlCommand, json: bool) -> anyhow::Result<ExitCode> {
    use DaemonKind::{Agent, Server};
    match command {
        CtlCommand::Status => match kind {
            Server => {
                let s: ServerStatus = get(c, "/v1/status").await?;
                if json {
                    print_json(&s);
                } else {
                    print_server_status(&s);
                }
            }
            Agent => {
                let s: AgentStatus = get(c, "/v1/status").await?;
                if json {
                    print_json(&s);
                } else {
                    print_agent_status(&s);
                }
            }
        },
        CtlCommand::Sessions => {
            need(kind, Server, "sessions")?;
            let v: Vec<SessionInfo> = get(c, "/v1/sessions").await?;
            if json {
                print_json(&v);
            } else {
                print_sessions(&v);
            }
        }
        CtlCommand::Agents => {
            need(kind, Server, "agents")?;
            let v: Vec<AgentInfo> = get(c, "/v1/agents").await?;
            if json {
                print_json(&v);
            } else {
                table(
                    &["AGENT", "CONNECTED", "ADDRESS", "VERSION", "RTT", "LOAD", "SESSIONS", "LAST SEEN"],
                    v.iter()
                        .map(|a| {
                            vec![
                                a.name.clone(),
                                yes(a.connected),
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
            }
        }
        CtlCommand::Entries => {
            need(kind, Agent, "entries")?;
            let v: Vec<EntryStatus> = get(c, "/v1/entries").await?;
            if json {
                print_json(&v);
            } else {
                print_entries(&v);
            }
        }
        CtlCommand::History { agent, limit } => {
            need(kind, Server, "history")?;
            let mut path = format!("/v1/history?limit={limit}");
            if let Some(a) = agent {
                path.push_str(&format!("&agent={}", q(&a)));
            }
            let v: Vec<HistoryRecord> = get(c, &path).await?;
            if json {
                print_json(&v);
            } else {
                table(
                    &["FINISHED", "AGENT", "BACKUP", "OUTCOME", "SIZE", "ARCHIVE / REASON"],
                    v.iter()
                        .map(|h| {
                            vec![
                                h.finished.clone(),
                                h.agent.clone(),
                                h.backup.clone(),
                                h.outcome.clone(),
                                human_bytes(h.bytes),
                                h.archive.clone().unwrap_or_else(|| h.message.clone()),
                            ]
                        })
                        .collect(),
                );
            }
        }
        CtlCommand::Events { since, limit } => {
            let v: Vec<Event> = get(c, &format!("/v1/events?since={since}&limit={limit}")).await?;
            if json {
                print_json(&v);
            } else {
                for e in &v {
                    let who =
                        [e.agent.as_deref(), e.backup.as_deref()].into_iter().flatten().collect::<Vec<_>>().join("/");
                    println!("{:>6} {} {:<18} {:<16} {}", e.seq, e.time, e.kind, who, e.message);
                }
            }
        }
        CtlCommand::Archives { agent, backup, storage } => {
            need(kind, Server, "archives")?;
            let mut params = Vec::new();
            for (k, v) in [("agent", agent), ("backup", backup), ("storage", storage)] {
                if let Some(v) = v {
                    params.push(format!("{k}={}", q(&v)));
                }
            }
            let v: Vec<ArchiveInfo> = get(c, &format!("/v1/archives?{}", params.join("&"))).await?;
            if json {
                print_json(&v);
            } else {
                table(
                    &["STORAGE", "AGENT", "BACKUP", "ARCHIVE", "SIZE", "MANIFEST"],
                    v.iter()
                        .map(|a| {
                            vec![
                                a.storage.clone(),
                                a.agent.clone(),
                                a.backup.clone(),
                                a.name.clone(),
                                human_bytes(a.size),
                                yes(a.manifest),
                            ]
                        })
                        .collect(),
                );
            }
        }
        CtlCommand::Abort { target, reason } => {
            let body = AbortRequest { reason };
            let path = match (kind, target.split_once('/')) {
                (Server, None) => format!("/v1/sessions/{}/abort", q(&target)),
                (Server, Some((agent, e))) => format!("/v1/agents/{}/entries/{}/abort", q(agent), q(e)),
                (Agent, None) => format!("/v1/entries/{}/abort", q(&target)),
                (Agent, Some(_)) => {
                    return Err(fail(Exit::Usage, anyhow::anyhow!("on the agent, name just the entry")));
                }
            };
            return act(c, &path, Some(&body), json).await;
        }
        CtlCommand::Rotate { session, stream } => {
            need(kind, Server, "rotate")?;
            return act(c, &format!("/v1/sessions/{}/streams/{stream}/rotate", q(&session)), None, json).await;
        }
        CtlCommand::Run { entry } => {
            let path = match (kind, entry.split_once('/')) {
                (Agent, None) => format!("/v1/entries/{}/run", q(&entry)),
                (Server, Some((agent, e))) => format!("/v1/agents/{}/entries/{}/run", q(agent), q(e)),
                (Server, None) => return Err(fail(Exit::Usage, anyhow::anyhow!("on the server, name AGENT/ENTRY"))),
                (Agent, Some(_)) => {
                    return Err(fail(Exit::Usage, anyhow::anyhow!("on the agent, name just the entry")));
                }
            };
            return act(c, &path, None, json).await;
        }
        CtlCommand::Defer { entry, seconds } => {
            let path = match (kind, entry.split_once('/')) {
                (Agent, None) => format!("/v1/entries/{}/defer?seconds={seconds}", q(&entry)),
                (Server, Some((agent, e))) => {
                    format!("/v1/agents/{}/entries/{}/defer?seconds={seconds}", q(agent), q(e))
                }
                _ => {
                    return Err(fail(
                        Exit::Usage,
                        anyhow::anyhow!("name ENTRY on the agent, AGENT/ENTRY on the server"),
                    ));
                }
            };
            return act(c, &path, None, json).await;
        }
        CtlCommand::Reload => return act(c, "/v1/reload", None, json).await,
        CtlCommand::Metrics => {
            need(kind, Server, "metrics")?;
            print!("{}", c.get_text("/metrics").await.map_err(err)?);
        }
    }
    Ok(Exit::Ok.into())
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Prints left-aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
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
                    s.phase.clone(),
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
                        st.state.clone(),
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
                        st.state.clone(),
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
        &["ENTRY", "STORAGE", "SCHEDULE", "NEXT RUN", "RUNNING", "LAST RESULT", "AGE"],
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
                    last,
                    e.last_age_secs.map_or("-".into(), |a| format!("{a}s")),
                ]
            })
            .collect(),
    );
}
