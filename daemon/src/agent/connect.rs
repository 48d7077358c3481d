//! Opening connections to the server: TCP, TLS 1.3 with the agent's certificate,
//! ALPN, preamble, first request — each phase with a deadline.

use std::io;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use nbackup_protocol::SessionId;
use nbackup_protocol::config::AgentConfig;
use nbackup_protocol::wire::{
    Caps, ConnKind, Frame, Health, Hello, Join, Joined, Preamble, Refusal, SessionState, Status, Welcome,
};

use crate::conn::{ConnError, FrameReader, FrameWriter};
use crate::tls::{self, TlsError};

/// What this agent can produce.
pub const AGENT_CAPS: Caps = Caps(Caps::GZIP.0 | Caps::ZSTD.0);

/// Bound on TCP connect, TLS handshake and each request/answer before a stream runs.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

pub type Reader = FrameReader<ReadHalf<TlsStream<TcpStream>>>;
pub type Writer = FrameWriter<WriteHalf<TlsStream<TcpStream>>>;

/// An established connection, split for concurrent reading and writing.
pub struct Connection {
    pub reader: Reader,
    pub writer: Writer,
    /// Round trip of the connection's first request and answer: a sample of the RTT.
    pub rtt: Duration,
    /// The certificates the server presented; kept for `ENRL` connections only,
    /// whose trust is decided after the handshake.
    pub peer_chain: Vec<CertificateDer<'static>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {address}: {source}")]
    Unreachable { address: String, source: io::Error },
    #[error("{phase} with {address} timed out after {after:?}")]
    Timeout { address: String, phase: &'static str, after: Duration },
    #[error("TLS with {address} failed: {detail}")]
    Tls { address: String, detail: String },
    #[error("server refused: {0}")]
    Refused(Refusal),
    #[error("connection to {address} failed: {detail}")]
    Lost { address: String, detail: String },
    #[error("protocol error from {address}: {detail}")]
    Protocol { address: String, detail: String },
}

impl ConnectError {
    /// Whether trying again later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Unreachable { .. } | ConnectError::Timeout { .. } | ConnectError::Lost { .. } => true,
            ConnectError::Refused(r) => r.reason.is_transient(),
            ConnectError::Tls { .. } | ConnectError::Protocol { .. } => false,
        }
    }
}

/// Turns an I/O error on a TLS stream into plain words. rustls reports certificate
/// problems as `InvalidData`; the server rejecting our certificate arrives as an alert
/// on the first read after the handshake (TLS 1.3 sends the client's certificate
/// last), so a refusal can show up here rather than in the handshake.
fn classify(address: &str, e: io::Error) -> ConnectError {
    let rustls_err = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
    match rustls_err {
        Some(rustls::Error::AlertReceived(alert)) => ConnectError::Tls {
            address: address.into(),
            detail: format!(
                "the server rejected this agent's certificate ({alert:?}); check that it was issued by the server's CA"
            ),
        },
        Some(rustls::Error::InvalidCertificate(why)) => ConnectError::Tls {
            address: address.into(),
            detail: format!("the server's certificate is not acceptable: {why:?}"),
        },
        Some(other) => ConnectError::Tls { address: address.into(), detail: other.to_string() },
        None => ConnectError::Lost { address: address.into(), detail: e.to_string() },
    }
}

fn conn_error(address: &str, e: ConnError) -> ConnectError {
    match e {
        ConnError::Io(io) => classify(address, io),
        ConnError::Decode(d) => ConnectError::Protocol { address: address.into(), detail: d.to_string() },
        other => ConnectError::Lost { address: address.into(), detail: other.to_string() },
    }
}

/// Everything needed to open connections to one server.
#[derive(Clone)]
pub struct Connector {
    tls: TlsConnector,
    address: String,
    server_name: ServerName<'static>,
    caps: Caps,
}

impl Connector {
    /// Reads the agent's key, certificate and CA — after completing a certificate
    /// renewal a crash interrupted, so key and certificate always agree.
    pub fn new(cfg: &AgentConfig) -> Result<Self, TlsError> {
        if let Err(e) = super::enroll::finish_install(&cfg.tls) {
            tracing::warn!("cannot complete the interrupted certificate renewal: {e}");
        }
        Ok(Connector {
            tls: TlsConnector::from(tls::client_config(&cfg.tls)?),
            address: cfg.server.address.clone(),
            server_name: tls::server_name(&cfg.server.server_name)?,
            caps: AGENT_CAPS,
        })
    }

    /// A connector for a first enrollment, before this host has a certificate or
    /// knows the CA: see [`tls::enrollment_client_config`] and [`Connector::enroll`].
    pub fn for_enrollment(endpoint: &nbackup_protocol::config::ServerEndpoint) -> Result<Self, TlsError> {
        Ok(Connector {
            tls: TlsConnector::from(tls::enrollment_client_config()),
            address: endpoint.address.clone(),
            server_name: tls::server_name(&endpoint.server_name)?,
            caps: AGENT_CAPS,
        })
    }

    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// A connector that announces other capabilities (tests of the server's checks).
    pub fn with_caps(mut self, caps: Caps) -> Self {
        self.caps = caps;
        self
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    async fn connect(&self, kind: ConnKind) -> Result<Connection, ConnectError> {
        let addr = self.address.as_str();
        let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout { address: addr.into(), phase: "TCP connect", after: CONNECT_TIMEOUT })?
            .map_err(|source| ConnectError::Unreachable { address: addr.into(), source })?;
        let _ = tcp.set_nodelay(true);
        let tls = timeout(CONNECT_TIMEOUT, self.tls.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| ConnectError::Timeout {
                address: addr.into(),
                phase: "TLS handshake",
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|e| classify(addr, e))?;
        if tls.get_ref().1.alpn_protocol() != Some(nbackup_protocol::wire::ALPN) {
            return Err(ConnectError::Protocol {
                address: addr.into(),
                detail: "the server did not negotiate ALPN nbkp/1; is this an nbackup server?".into(),
            });
        }
        let peer_chain = match kind {
            ConnKind::Enroll => tls.get_ref().1.peer_certificates().map(<[_]>::to_vec).unwrap_or_default(),
            _ => Vec::new(),
        };
        let (r, w) = tokio::io::split(tls);
        let mut conn =
            Connection { reader: FrameReader::new(r), writer: FrameWriter::new(w), rtt: Duration::ZERO, peer_chain };
        conn.writer.send_preamble(&Preamble::new(kind, self.caps)).await.map_err(|e| classify(addr, e))?;
        Ok(conn)
    }

    async fn request(&self, conn: &mut Connection, frame: Option<&Frame>) -> Result<Frame, ConnectError> {
        let addr = self.address.as_str();
        let sent = std::time::Instant::now();
        if let Some(frame) = frame {
            conn.writer.send(frame).await.map_err(|e| classify(addr, e))?;
        }
        let answer = timeout(CONNECT_TIMEOUT, conn.reader.read_frame()).await;
        conn.rtt = sent.elapsed();
        match answer {
            Err(_) => Err(ConnectError::Timeout {
                address: addr.into(),
                phase: "waiting for the server",
                after: CONNECT_TIMEOUT,
            }),
            Ok(Err(e)) => Err(conn_error(addr, e)),
            Ok(Ok(Frame::Refused(r))) => Err(ConnectError::Refused(r)),
            Ok(Ok(f)) => Ok(f),
        }
    }

    fn unexpected(&self, wanted: &str, got: &Frame) -> ConnectError {
        ConnectError::Protocol {
            address: self.address.clone(),
            detail: format!("expected {wanted}, got {}", got.frame_type().name()),
        }
    }

    /// Opens a backup session; the returned connection is its stream 0.
    pub async fn open_session(&self, hello: Hello) -> Result<(Connection, Welcome), ConnectError> {
        let mut conn = self.connect(ConnKind::Backup).await?;
        match self.request(&mut conn, Some(&Frame::Hello(hello))).await? {
            Frame::Welcome(w) => Ok((conn, w)),
            other => Err(self.unexpected("Welcome", &other)),
        }
    }

    /// Attaches (or re-attaches) stream `stream` to `session`.
    pub async fn join(
        &self,
        session: SessionId,
        stream: u16,
        generation: u32,
    ) -> Result<(Connection, Joined), ConnectError> {
        let mut conn = self.connect(ConnKind::Join).await?;
        match self.request(&mut conn, Some(&Frame::Join(Join { session, stream, generation }))).await? {
            Frame::Joined(j) if j.stream == stream => Ok((conn, j)),
            other => Err(self.unexpected("Joined", &other)),
        }
    }

    /// Asks what became of `session`.
    pub async fn status(&self, session: SessionId) -> Result<SessionState, ConnectError> {
        let mut conn = self.connect(ConnKind::Join).await?;
        match self.request(&mut conn, Some(&Frame::Status(Status { session }))).await? {
            Frame::SessionState(s) => Ok(s),
            other => Err(self.unexpected("SessionState", &other)),
        }
    }

    /// Opens the control channel.
    pub async fn control(&self) -> Result<Connection, ConnectError> {
        self.connect(ConnKind::Control).await
    }

    /// Opens a restore connection with `request`; returns it with the first answer.
    pub async fn restore(
        &self,
        request: &nbackup_protocol::restore::RestoreRequest,
    ) -> Result<(Connection, nbackup_protocol::restore::RestoreReply), ConnectError> {
        let mut conn = self.connect(ConnKind::Restore).await?;
        let json = serde_json::to_string(request).map_err(|e| ConnectError::Protocol {
            address: self.address.clone(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        let first = self.request(&mut conn, Some(&Frame::RestoreRequest(json))).await?;
        let reply = self.restore_reply(&first)?;
        Ok((conn, reply))
    }

    /// Decodes a `RestoreReply` frame.
    pub fn restore_reply(&self, frame: &Frame) -> Result<nbackup_protocol::restore::RestoreReply, ConnectError> {
        match frame {
            Frame::RestoreReply(json) => serde_json::from_str(json).map_err(|e| ConnectError::Protocol {
                address: self.address.clone(),
                detail: format!("bad restore reply: {e}"),
            }),
            Frame::Refused(r) => Err(ConnectError::Refused(r.clone())),
            other => Err(self.unexpected("RestoreReply", other)),
        }
    }

    /// An `ENRL` exchange: reads the CA the server sends, lets `trust` accept it (and
    /// the chain the server presented) before anything is sent, then sends
    /// `request`. Returns the CA (PEM) and the issued certificate (PEM) with its end.
    pub async fn enroll(
        &self,
        request: &nbackup_protocol::enroll::EnrollRequest,
        trust: impl FnOnce(&str, &[CertificateDer<'static>]) -> Result<(), String>,
    ) -> Result<(String, String, String), ConnectError> {
        use nbackup_protocol::enroll::EnrollReply;
        let mut conn = self.connect(ConnKind::Enroll).await?;
        let reply = |frame: Frame| match frame {
            Frame::EnrollReply(json) => serde_json::from_str::<EnrollReply>(&json).map_err(|e| {
                ConnectError::Protocol { address: self.address.clone(), detail: format!("bad enrollment reply: {e}") }
            }),
            other => Err(self.unexpected("EnrollReply", &other)),
        };
        let ca = match reply(self.request(&mut conn, None).await?)? {
            EnrollReply::Authority { ca } => ca,
            EnrollReply::Issued { .. } => {
                return Err(ConnectError::Protocol {
                    address: self.address.clone(),
                    detail: "the server sent a certificate before its CA".into(),
                });
            }
        };
        trust(&ca, &conn.peer_chain).map_err(|detail| ConnectError::Tls { address: self.address.clone(), detail })?;
        let json = serde_json::to_string(request).map_err(|e| ConnectError::Protocol {
            address: self.address.clone(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        match reply(self.request(&mut conn, Some(&Frame::EnrollRequest(json))).await?)? {
            EnrollReply::Issued { cert, not_after } => Ok((ca, cert, not_after)),
            EnrollReply::Authority { .. } => Err(self.unexpected("Issued", &Frame::EnrollReply(String::new()))),
        }
    }

    /// Asks the server for its health.
    pub async fn health(&self) -> Result<Health, ConnectError> {
        let mut conn = self.connect(ConnKind::Ping).await?;
        match self.request(&mut conn, None).await? {
            Frame::Health(h) => Ok(h),
            other => Err(self.unexpected("Health", &other)),
        }
    }
}
