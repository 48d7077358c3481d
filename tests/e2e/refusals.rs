//! Every refusal is typed, reaches the agent in plain words, and loses nothing.

use std::fs;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use nbackup_daemon::agent::{BackupError, Connector};
use nbackup_protocol::SessionId;
use nbackup_protocol::config::AgentConfig;
use nbackup_protocol::wire::{self, Caps, ConnKind, Frame, Join, PROTOCOL_VERSION, Preamble, Reason};

use crate::support::*;

fn refusal_reason(r: &Result<nbackup_daemon::agent::BackupReport, BackupError>) -> Reason {
    match r {
        Ok(_) => panic!("expected a refusal, got a committed backup"),
        Err(e) => e.refusal().unwrap_or_else(|| panic!("expected a refusal, got {e}")).reason,
    }
}

/// Reads one frame from a raw connection.
async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<Frame> {
    let mut buf = BytesMut::new();
    loop {
        if let Ok(Some(f)) = wire::decode_frame(&mut buf) {
            return Some(f);
        }
        let mut tmp = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

#[tokio::test]
async fn unknown_storage_is_refused_with_the_valid_names() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main"), zstd("other")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "nope", &[tmp.path()])]);
    let r = backup(&cfg, 0).await;
    assert_eq!(refusal_reason(&r), Reason::UnknownStorage);
    let msg = r.expect_err("refused").to_string();
    assert!(msg.contains("no storage \"nope\"") && msg.contains("main, other"), "{msg}");
    assert!(msg.contains("the server has no storage of that name"), "plain words: {msg}");
    server.stop().await;
}

#[tokio::test]
async fn a_second_session_for_the_same_entry_is_busy_and_other_entries_run() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "2M", 3);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src]), entry("www", "main", &[&src])]);
    let connector = Connector::new(&cfg).expect("connector");
    // Hold a session for `etc` open with a live stream.
    let (held, _welcome) = connector.open_session(hello("web-01", "main", "etc")).await.expect("first session");
    let r = backup(&cfg, 0).await;
    assert_eq!(refusal_reason(&r), Reason::Busy);
    assert!(r.expect_err("busy").to_string().contains("still running"));
    // A different entry is not blocked.
    backup(&cfg, 1).await.expect("other entry commits while etc is busy");
    // The holder goes away (as if killed): the next run supersedes its session at once.
    drop(held);
    let started = Instant::now();
    loop {
        match backup(&cfg, 0).await {
            Ok(_) => break,
            Err(e)
                if e.refusal().is_some_and(|r| r.reason == Reason::Busy)
                    && started.elapsed() < Duration::from_secs(5) =>
            {
                // The server notices the closed connection asynchronously.
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("after the holder left: {e}"),
        }
    }
    assert!(server.incoming("main").is_empty(), "the superseded upload was removed");
    server.stop().await;
}

#[tokio::test]
async fn a_storage_too_full_for_the_previous_archive_refuses_up_front() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    // A previous archive larger than any disk here (sparse, costs nothing).
    let dir = server.storage_dir("main").join("web-01/etc");
    fs::create_dir_all(&dir).expect("mkdir");
    let prev = fs::File::create(dir.join("web-01-etc-20260101T000000Z.tar.gz")).expect("create");
    prev.set_len(1 << 43).expect("sparse");
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[tmp.path()])]);
    let r = backup(&cfg, 0).await;
    assert_eq!(refusal_reason(&r), Reason::DiskFull);
    let msg = r.expect_err("refused").to_string();
    assert!(msg.contains("previous archive of this entry was 8796093022208 bytes"), "{msg}");
    assert!(server.incoming("main").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn an_agent_name_that_differs_from_its_certificate_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let (logs, _guard) = Logs::capture();
    // web-02's config, but web-01's certificate.
    let yaml =
        agent_yaml(&pki, "web-02", &pki.agent("web-01"), server.addr, &[entry("etc", "main", &[tmp.path()])], "");
    let cfg = AgentConfig::parse(&yaml, std::path::Path::new("a.yaml")).expect("config");
    let r = backup(&cfg, 0).await;
    assert_eq!(refusal_reason(&r), Reason::IdentityMismatch);
    let msg = r.expect_err("refused").to_string();
    assert!(msg.contains("agent says it is \"web-02\" but its certificate is for web-01"), "{msg}");
    logs.wait_for("identity mismatch").await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_cannot_produce_the_storage_compression_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[zstd("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[tmp.path()])]);
    let connector = Connector::new(&cfg).expect("connector").with_caps(Caps::GZIP);
    match connector.open_session(hello("web-01", "main", "etc")).await {
        Err(nbackup_daemon::agent::ConnectError::Refused(r)) => {
            assert_eq!(r.reason, Reason::Unsupported);
            assert!(r.message.contains("needs zstd"), "{}", r.message);
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("session should be refused"),
    }
    server.stop().await;
}

#[tokio::test]
async fn a_newer_protocol_version_is_refused_as_bad_version() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    // A newer peer, and a version-1 agent from before Keepalive and Committing.
    for version in [PROTOCOL_VERSION + 98, 1] {
        let mut tls = raw_tls(server.addr, &pki, Some(&pki.agent("web-01")), false).await.expect("tls");
        let mut p = Preamble::new(ConnKind::Backup, Caps::GZIP);
        p.version = version;
        tls.write_all(&p.encode()).await.expect("preamble");
        match read_frame(&mut tls).await {
            Some(Frame::Refused(r)) => {
                assert_eq!(r.reason, Reason::BadVersion);
                let want = format!("server speaks protocol {PROTOCOL_VERSION}, client {version}");
                assert!(r.message.contains(&want), "{}", r.message);
            }
            other => panic!("expected BadVersion, got {other:?}"),
        }
    }
    server.stop().await;
}

async fn raw_join(
    addr: std::net::SocketAddr,
    pki: &Pki,
    agent: &str,
    session: SessionId,
    stream: u16,
    generation: u32,
) -> (Option<Frame>, tokio_rustls::client::TlsStream<tokio::net::TcpStream>) {
    let mut tls = raw_tls(addr, pki, Some(&pki.agent(agent)), false).await.expect("tls");
    tls.write_all(&Preamble::new(ConnKind::Join, Caps::GZIP).encode()).await.expect("preamble");
    tls.write_all(&Frame::Join(Join { session, stream, generation }).to_bytes().expect("encodes")).await.expect("join");
    (read_frame(&mut tls).await, tls)
}

#[tokio::test]
async fn joins_for_unknown_foreign_or_duplicate_streams_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    pki.agent("web-02");
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[tmp.path()])]);
    let connector = Connector::new(&cfg).expect("connector");
    let (_held, welcome) = connector.open_session(hello("web-01", "main", "etc")).await.expect("session");

    let addr = server.addr;
    let join =
        |agent: &'static str, session, stream, generation| raw_join(addr, &pki, agent, session, stream, generation);
    let reason = |f: Option<Frame>| match f {
        Some(Frame::Refused(r)) => r.reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Another agent's session: web-02 joining web-01's session.
    assert_eq!(reason(join("web-02", welcome.session, 1, 1).await.0), Reason::NotAllowed);
    assert_eq!(reason(join("web-01", SessionId([9; 16]), 1, 1).await.0), Reason::UnknownSession);
    assert_eq!(reason(join("web-01", welcome.session, 40, 1).await.0), Reason::TooManyStreams);
    // Stream 1 joins; the same generation again is a duplicate; a newer one replaces it.
    let (first, _keep) = join("web-01", welcome.session, 1, 1).await;
    assert!(matches!(first, Some(Frame::Joined(_))), "{first:?}");
    assert_eq!(reason(join("web-01", welcome.session, 1, 1).await.0), Reason::Busy);
    let (newer, _keep2) = join("web-01", welcome.session, 1, 2).await;
    assert!(matches!(newer, Some(Frame::Joined(_))), "{newer:?}");
    server.stop().await;
}

#[tokio::test]
async fn hostile_bytes_are_refused_without_harming_other_sessions() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let src = dataset(&tmp.path().join("data"), "2M", 5);
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let (logs, _guard) = Logs::capture();
    let agent = pki.agent("web-01");
    // Garbage instead of a preamble.
    let mut a = raw_tls(server.addr, &pki, Some(&agent), false).await.expect("tls");
    a.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    assert!(read_frame(&mut a).await.is_none(), "closed without an answer");
    // A frame declaring 4 GiB right after a valid preamble.
    let mut b = raw_tls(server.addr, &pki, Some(&agent), false).await.expect("tls");
    b.write_all(&Preamble::new(ConnKind::Backup, Caps::GZIP).encode()).await.expect("preamble");
    b.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff]).await.expect("header");
    assert!(read_frame(&mut b).await.is_none());
    // A Chunk before any Hello.
    let mut c = raw_tls(server.addr, &pki, Some(&agent), false).await.expect("tls");
    c.write_all(&Preamble::new(ConnKind::Backup, Caps::GZIP).encode()).await.expect("preamble");
    let chunk = wire::Chunk::new(0, 0, bytes::Bytes::from_static(b"x"));
    c.write_all(&Frame::Chunk(chunk).to_bytes().expect("encodes")).await.expect("chunk");
    match read_frame(&mut c).await {
        Some(Frame::Refused(r)) => assert_eq!(r.reason, Reason::Protocol),
        other => panic!("expected a protocol refusal, got {other:?}"),
    }
    let text = logs.wait_for("expected Hello, got Chunk").await;
    assert!(text.contains("bad preamble") && text.contains("declares 4294967295 bytes"), "{text}");
    // Meanwhile a real backup is unaffected.
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    backup(&cfg, 0).await.expect("a real backup still commits");
    server.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_handshake_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start_with(tmp.path(), &pki, &[gzip("main")], "  handshake_timeout: 300ms\n").await;
    // Plain TCP that never starts TLS (slowloris).
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await.expect("server closes in time");
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(5));
    // TLS done, then one byte of preamble and silence.
    let mut tls = raw_tls(server.addr, &pki, Some(&pki.agent("web-01")), false).await.expect("tls");
    tls.write_all(b"N").await.expect("one byte");
    assert!(read_frame(&mut tls).await.is_none(), "dropped after the preamble deadline");
    // A trickle: a valid preamble and Hello, one byte every 100 ms. Each byte arrives
    // well within any per-read timeout, but the phase as a whole has a deadline.
    let mut tls = raw_tls(server.addr, &pki, Some(&pki.agent("web-01")), false).await.expect("tls");
    let mut bytes = Preamble::new(ConnKind::Backup, Caps::GZIP).encode().to_vec();
    bytes.extend_from_slice(&Frame::Hello(hello("web-01", "main", "etc")).to_bytes().expect("encodes"));
    let started = Instant::now();
    for b in bytes {
        if tls.write_all(&[b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    assert!(read_frame(&mut tls).await.is_none(), "a trickling peer never gets a session");
    assert!(server.incoming("main").is_empty());
    server.stop().await;
}
