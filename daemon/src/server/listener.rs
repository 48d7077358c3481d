//! Accepting connections: the handshake cap, TCP liveness options, the TLS
//! handshake, ALPN and preamble — each phase with its deadline — and dispatch by
//! connection kind. The handshake runs in the connection's own task, never in the
//! accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use nbackup_protocol::wire::{Caps, ConnKind, Frame, PROTOCOL_VERSION, Reason, Refusal};

use super::{Server, control, handler};
use crate::conn::{FrameReader, FrameWriter};
use crate::tls;

/// What the server knows about a connection before its first frame.
pub struct Conn {
    pub peer: SocketAddr,
    pub identities: Vec<String>,
    pub caps: Caps,
}

impl Conn {
    /// Whether this connection's certificate vouches for `agent`.
    pub fn owns(&self, agent: &nbackup_protocol::Name) -> bool {
        self.identities.iter().any(|i| i == agent.as_str())
    }
}

/// Kernel-level liveness on every connection, below our own keepalives: probes
/// after 30 s idle, and unacknowledged data failing the socket after 60 s
/// (`TCP_USER_TIMEOUT`), so a peer that vanished mid-send is found even while our
/// writes sit in the send buffer.
pub fn tune_socket(tcp: &TcpStream) {
    use rustix::net::sockopt;
    let _ = tcp.set_nodelay(true);
    let _ = sockopt::set_socket_keepalive(tcp, true);
    let _ = sockopt::set_tcp_keepidle(tcp, Duration::from_secs(30));
    let _ = sockopt::set_tcp_keepintvl(tcp, Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(tcp, 3);
    let _ = sockopt::set_tcp_user_timeout(tcp, 60_000);
}

/// Accepts until `shutdown`. Beyond `max_handshakes` connections still before their
/// first frame, new ones are closed at once.
pub async fn accept_loop(server: Arc<Server>, listener: TcpListener, shutdown: CancellationToken) {
    let mut refused_warned = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, peer)) => {
                let Ok(permit) = server.handshakes.clone().try_acquire_owned() else {
                    if refused_warned.elapsed() > Duration::from_secs(10) {
                        refused_warned = std::time::Instant::now();
                        warn!(%peer, "too many connections in the handshake (server.max_handshakes); closing new ones");
                    }
                    drop(tcp);
                    continue;
                };
                let s = server.clone();
                let acceptor = server.live().acceptor.clone();
                server.tracker.spawn(async move { s.handle_connection(acceptor, tcp, peer, permit).await });
            }
            // Out of file descriptors or similar: back off briefly instead of spinning.
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Server {
    async fn handle_connection(
        self: Arc<Self>,
        acceptor: TlsAcceptor,
        tcp: TcpStream,
        peer: SocketAddr,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let hs = self.live().config.handshake_timeout;
        tune_socket(&tcp);
        let tls = match timeout(hs, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                warn!(%peer, "TLS handshake refused: {e}");
                return;
            }
            Err(_) => {
                warn!(%peer, "TLS handshake timed out after {hs:?}");
                return;
            }
        };
        let (identities, authenticated, alpn_ok) = {
            let conn = tls.get_ref().1;
            (
                tls::peer_identities(conn),
                conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                conn.alpn_protocol() == Some(nbackup_protocol::wire::ALPN),
            )
        };
        let (r, w) = tokio::io::split(tls);
        let mut reader = FrameReader::new(r);
        let mut writer = FrameWriter::new(w);
        if !alpn_ok {
            warn!(%peer, "refused: client did not negotiate ALPN nbkp/1");
            return;
        }
        let preamble = match timeout(hs, reader.read_preamble()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                warn!(%peer, ?identities, "refused: bad preamble: {e}");
                return;
            }
            Err(_) => {
                warn!(%peer, ?identities, "refused: no preamble within {hs:?}");
                return;
            }
        };
        if preamble.version != PROTOCOL_VERSION {
            let r = Refusal::new(
                Reason::BadVersion,
                format!("server speaks protocol {PROTOCOL_VERSION}, client {}", preamble.version),
            );
            warn!(%peer, ?identities, "refused: {r}");
            let _ = writer.send(&Frame::Refused(r)).await;
            return;
        }
        // With enrollment on, the TLS layer lets a client without a certificate
        // through; it may ask for one and nothing else.
        if !authenticated && preamble.kind != ConnKind::Enroll {
            let r = Refusal::new(Reason::NotAllowed, "a client certificate is required");
            warn!(%peer, kind = ?preamble.kind, "refused: no client certificate");
            let _ = writer.send(&Frame::Refused(r)).await;
            return;
        }
        let conn = Conn { peer, identities, caps: preamble.caps };
        match preamble.kind {
            ConnKind::Ping => {
                drop(permit);
                handler::ping(&self, &conn, writer).await;
            }
            ConnKind::Backup => handler::backup(self, conn, reader, writer, permit).await,
            ConnKind::Join => handler::join(self, conn, reader, writer, permit).await,
            ConnKind::Restore => super::restore::handle(self, conn, reader, writer, permit).await,
            ConnKind::Enroll => super::enroll::handle(self, conn, authenticated, reader, writer, permit).await,
            ConnKind::Control => {
                drop(permit);
                control::handle(super::handle::ControlHandle::new(self), conn, reader, writer).await;
            }
        }
    }
}
