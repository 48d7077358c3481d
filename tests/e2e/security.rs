//! TLS 1.3 only, client certificates always, identity from the certificate.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use nbackup_daemon::agent::{BackupError, ConnectError};
use nbackup_daemon::pki::{self, Leaf};
use nbackup_protocol::config::AgentConfig;
use nbackup_protocol::wire::{Caps, ConnKind, Preamble};

use crate::support::*;

/// After a TLS 1.3 handshake the client learns of a rejected certificate only when it
/// reads; anything but a clean answer counts as refused.
async fn refused_after_handshake(mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> bool {
    let _ = tls.write_all(&Preamble::new(ConnKind::Ping, Caps::default()).encode()).await;
    let mut buf = [0u8; 64];
    !matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
}

#[tokio::test]
async fn a_tls12_client_is_refused_and_logged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let (logs, _guard) = Logs::capture();
    let r = raw_tls(server.addr, &pki, Some(&pki.agent("web-01")), true).await;
    assert!(r.is_err(), "TLS 1.2 handshake must fail");
    let text = logs.wait_for("TLS handshake refused").await;
    assert!(text.contains("peer is incompatible"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_and_logged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let (logs, _guard) = Logs::capture();
    match raw_tls(server.addr, &pki, None, false).await {
        Err(_) => {}
        Ok(tls) => assert!(refused_after_handshake(tls).await),
    }
    let text = logs.wait_for("TLS handshake refused").await;
    assert!(text.contains("NoCertificatesPresented") || text.contains("certificate"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn with_enrollment_on_a_client_without_a_certificate_may_only_ask_for_one() {
    use nbackup_daemon::conn::{FrameReader, FrameWriter};
    use nbackup_protocol::enroll::{EnrollReply, EnrollRequest};
    use nbackup_protocol::wire::{Frame, Reason};
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start_enrolling(tmp.path(), &pki, &[gzip("main")]).await;
    let open = |kind: ConnKind| {
        let pki = &pki;
        async move {
            let tls = raw_tls(server.addr, pki, None, false).await.expect("the handshake admits no certificate");
            let (r, w) = tokio::io::split(tls);
            let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
            writer.send_preamble(&Preamble::new(kind, Caps(3))).await.expect("preamble");
            let first = reader.read_frame().await.expect("an answer");
            (reader, writer, first)
        }
    };
    for kind in [ConnKind::Backup, ConnKind::Join, ConnKind::Ping, ConnKind::Control, ConnKind::Restore] {
        match open(kind).await.2 {
            Frame::Refused(r) => {
                assert_eq!(r.reason, Reason::NotAllowed, "{kind:?}");
                assert!(r.message.contains("client certificate is required"), "{r}");
            }
            other => panic!("{kind:?} without a certificate got {other:?}"),
        }
    }
    // ENRL: the server shows its CA first.
    let (mut reader, mut writer, first) = open(ConnKind::Enroll).await;
    let Frame::EnrollReply(json) = first else { panic!("expected the CA, got {first:?}") };
    let EnrollReply::Authority { ca } = serde_json::from_str(&json).expect("reply") else { panic!("{json}") };
    assert_eq!(ca, pki.ca.cert_pem);
    // A renewal needs the certificate being renewed.
    let (_, csr) = pki::request("web-01").expect("csr");
    let renew = serde_json::to_string(&EnrollRequest::Renew { csr: csr.clone() }).expect("json");
    writer.send(&Frame::EnrollRequest(renew)).await.expect("send");
    match reader.read_frame().await.expect("answer") {
        Frame::Refused(r) => assert!(r.message.contains("enroll with a token"), "{r}"),
        other => panic!("{other:?}"),
    }
    // A made-up token and a request that is not JSON are refused too.
    let (mut reader, mut writer, _) = open(ConnKind::Enroll).await;
    let token = format!("nbk1-{}", "ab".repeat(32));
    let enroll = EnrollRequest::Enroll { agent: nbackup_protocol::Name::new("web-09").expect("name"), token, csr };
    writer.send(&Frame::EnrollRequest(serde_json::to_string(&enroll).expect("json"))).await.expect("send");
    match reader.read_frame().await.expect("answer") {
        Frame::Refused(r) => assert!(r.reason == Reason::NotAllowed && r.message.contains("unknown"), "{r}"),
        other => panic!("{other:?}"),
    }
    let (mut reader, mut writer, _) = open(ConnKind::Enroll).await;
    writer.send(&Frame::EnrollRequest("{\"op\":\"steal\"}".into())).await.expect("send");
    match reader.read_frame().await.expect("answer") {
        Frame::Refused(r) => assert_eq!(r.reason, Reason::Protocol, "{r}"),
        other => panic!("{other:?}"),
    }
    // Agents with certificates are unaffected.
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&tmp.path().join("pki")])]);
    backup(&cfg, 0).await.expect("a certified agent backs up as before");
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_agent_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let (logs, _guard) = Logs::capture();
    let foreign = pki.foreign_agent("web-01");
    let yaml = agent_yaml(&pki, "web-01", &foreign, server.addr, &[entry("etc", "main", &[tmp.path()])], "");
    let cfg = AgentConfig::parse(&yaml, std::path::Path::new("a.yaml")).expect("config");
    let err = backup(&cfg, 0).await.expect_err("foreign certificate refused");
    let msg = err.to_string();
    assert!(matches!(err, BackupError::Connect(ConnectError::Tls { .. })), "{msg}");
    assert!(msg.contains("rejected this agent's certificate"), "{msg}");
    assert!(!err.is_transient(), "a wrong certificate is not retried");
    logs.wait_for("TLS handshake refused").await;
    server.stop().await;
}

#[tokio::test]
async fn a_server_certificate_cannot_be_used_as_an_agent_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let (logs, _guard) = Logs::capture();
    // Signed by the right CA, but for server authentication only.
    let pair = pki::issue(&pki.ca, &Leaf::Server(vec!["web-01".into()]), 1).expect("issue");
    let prefix = tmp.path().join("pki/server-as-agent");
    pki::write_pair(&prefix, &pair, false).expect("write");
    match raw_tls(server.addr, &pki, Some(&prefix), false).await {
        Err(_) => {}
        Ok(tls) => assert!(refused_after_handshake(tls).await),
    }
    logs.wait_for("TLS handshake refused").await;
    server.stop().await;
}

#[tokio::test]
async fn the_agent_refuses_a_server_its_ca_did_not_sign() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let impostor_pki = Pki::new(&tmp.path().join("impostor"));
    let server = TestServer::start(tmp.path(), &impostor_pki, &[gzip("main")]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[tmp.path()])]);
    let err = backup(&cfg, 0).await.expect_err("impostor server refused");
    let msg = err.to_string();
    assert!(msg.contains("server's certificate is not acceptable"), "{msg}");
    assert!(!err.is_transient(), "an untrusted server is not retried");
    server.stop().await;
}

#[tokio::test]
async fn private_keys_are_written_owner_only_and_never_logged() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    for name in ["ca.key", "server.key", "web-01.key"] {
        let mode = std::fs::metadata(pki.dir.join(name)).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let (logs, _guard) = Logs::capture();
    let server = TestServer::start(tmp.path(), &pki, &[gzip("main")]).await;
    let src = dataset(&tmp.path().join("d"), "1M", 2);
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    backup(&cfg, 0).await.expect("backup");
    server.stop().await;
    let text = logs.text();
    // Logged by the connection task on this thread before the agent is welcomed,
    // so it is there whatever the timing ("committed" comes from a blocking thread).
    assert!(text.contains("session opened"), "logs were captured: {text}");
    assert!(!text.contains("PRIVATE KEY"), "no key material in logs");
}
