//! A local SMTP relay for tests: EHLO, STARTTLS (with the test PKI's server
//! certificate), AUTH PLAIN / LOGIN, MAIL, RCPT, DATA. Every accepted message is
//! handed to the test; the first `fail_first` DATA commands are answered 451 so a
//! test sees the sender retry.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One message as the relay received it.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
    /// `user:password` from AUTH, if the client authenticated.
    pub login: Option<String>,
    /// Whether the message came over TLS.
    pub tls: bool,
}

pub async fn start(pki_dir: &Path, fail_first: usize) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Mail>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki_dir.join("server.crt"))
        .expect("server.crt")
        .collect::<Result<_, _>>()
        .expect("certs");
    let key = PrivateKeyDer::from_pem_file(pki_dir.join("server.key")).expect("server.key");
    let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(fail_first));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (tx, acceptor, failures) = (tx.clone(), acceptor.clone(), failures.clone());
            tokio::spawn(async move {
                let mut plain = BufReader::new(tcp);
                if plain.get_mut().write_all(b"220 sink ESMTP\r\n").await.is_err() {
                    return;
                }
                if converse(&mut plain, false, &tx, &failures).await == Next::StartTls {
                    let Ok(tls) = acceptor.accept(plain.into_inner()).await else { return };
                    let mut tls = BufReader::new(tls);
                    converse(&mut tls, true, &tx, &failures).await;
                }
            });
        }
    });
    (addr, rx)
}

#[derive(PartialEq, Eq)]
enum Next {
    Done,
    StartTls,
}

async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    tls: bool,
    tx: &tokio::sync::mpsc::UnboundedSender<Mail>,
    failures: &std::sync::atomic::AtomicUsize,
) -> Next {
    let mut mail = Mail { tls, ..Default::default() };
    let mut line = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line).await.unwrap_or(0) == 0 {
            return Next::Done;
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            if tls { "250-sink\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n" } else { "250-sink\r\n250 STARTTLS\r\n" }
                .into()
        } else if upper == "STARTTLS" && !tls {
            let _ = s.get_mut().write_all(b"220 go ahead\r\n").await;
            return Next::StartTls;
        } else if let Some(b64) = upper.strip_prefix("AUTH PLAIN ").map(|_| &cmd[11..]) {
            let raw = decode_b64(b64);
            let parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            if let [_, user, pass] = parts.as_slice() {
                mail.login = Some(format!("{}:{}", String::from_utf8_lossy(user), String::from_utf8_lossy(pass)));
            }
            "235 ok\r\n".into()
        } else if upper == "AUTH LOGIN" {
            let _ = s.get_mut().write_all(b"334 VXNlcm5hbWU6\r\n").await;
            let mut user = String::new();
            let _ = s.read_line(&mut user).await;
            let _ = s.get_mut().write_all(b"334 UGFzc3dvcmQ6\r\n").await;
            let mut pass = String::new();
            let _ = s.read_line(&mut pass).await;
            mail.login = Some(format!(
                "{}:{}",
                String::from_utf8_lossy(&decode_b64(user.trim())),
                String::from_utf8_lossy(&decode_b64(pass.trim()))
            ));
            "235 ok\r\n".into()
        } else if upper.starts_with("MAIL FROM:") {
            mail.from = cmd[10..].trim().to_string();
            "250 ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            mail.to.push(cmd[8..].trim().to_string());
            "250 ok\r\n".into()
        } else if upper == "DATA" {
            let _ = s.get_mut().write_all(b"354 end with .\r\n").await;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if s.read_line(&mut l).await.unwrap_or(0) == 0 {
                    return Next::Done;
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(&l);
            }
            let left = failures.load(std::sync::atomic::Ordering::SeqCst);
            if left > 0 {
                failures.store(left - 1, std::sync::atomic::Ordering::SeqCst);
                "451 try again later\r\n".into()
            } else {
                mail.data = data;
                let _ = tx.send(std::mem::take(&mut mail));
                mail.tls = tls;
                "250 queued\r\n".into()
            }
        } else if upper == "RSET" || upper == "NOOP" {
            "250 ok\r\n".into()
        } else if upper == "QUIT" {
            let _ = s.get_mut().write_all(b"221 bye\r\n").await;
            return Next::Done;
        } else {
            "502 not implemented\r\n".into()
        };
        if s.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return Next::Done;
        }
    }
}

fn decode_b64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| *c != b'=') {
        let Some(v) = ALPHABET.iter().position(|a| *a == c) else { continue };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
