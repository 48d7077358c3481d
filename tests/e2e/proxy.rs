//! A TCP proxy that breaks connections on purpose: cut or reset after N bytes,
//! black-hole one direction, delay and throttle, or cut at random for soak tests.
//! `tc netem` is not available on these machines; this is the network.
//!
//! Faults are planned per connection, in accept order, so a test can say "the first
//! connection dies after 3 MiB; the re-join goes through".

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What happens to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Fault {
    /// Close both sides (FIN) once this many bytes went agent → server.
    CutAfter(u64),
    /// Reset both sides (RST) once this many bytes went agent → server.
    ResetAfter(u64),
    /// After this many bytes agent → server, server → agent data is discarded while
    /// both TCP connections stay open (acks vanish).
    BlackholeDownAfter(u64),
    /// After this many bytes, agent → server data is discarded (chunks vanish).
    BlackholeUpAfter(u64),
    /// After this many bytes agent → server, nothing passes either way and nothing is
    /// ever closed: a host pulled off the network (no FIN, no RST).
    FreezeAfter(u64),
    /// Close both sides once this many bytes went server → agent (a restore cut
    /// mid-download).
    CutDownAfter(u64),
}

#[derive(Debug, Default)]
struct Plan {
    faults: HashMap<usize, Fault>,
    /// Cut every connection after a random time in this range (soak tests).
    random_cut: Option<(Duration, Duration)>,
    delay: Duration,
    /// Bytes per second per direction, 0 for unlimited.
    rate: u64,
    pause_after: Option<u64>,
    /// Connections from this index on are closed at once.
    refuse_from: Option<usize>,
}

struct Pause {
    rx: tokio::sync::watch::Receiver<bool>,
    tx: Arc<tokio::sync::watch::Sender<bool>>,
    after: Option<u64>,
    /// Shared by all connections: the planned pause happens once.
    armed: Arc<AtomicBool>,
}

pub struct Proxy {
    pub addr: SocketAddr,
    plan: Arc<Mutex<Plan>>,
    /// While true, agent → server data is held back (not lost): backpressure reaches
    /// the agent's window and stalls its producer.
    paused: Arc<tokio::sync::watch::Sender<bool>>,
    pause_armed: Arc<AtomicBool>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Connections the proxy broke on purpose.
    pub broken: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let plan = Arc::new(Mutex::new(Plan::default()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let broken = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (paused, pause_rx) = tokio::sync::watch::channel(false);
        let paused = Arc::new(paused);
        let pause_armed = Arc::new(AtomicBool::new(true));
        let armed = pause_armed.clone();
        let (p, a, b, s, pause_tx) = (plan.clone(), accepted.clone(), broken.clone(), stop.clone(), paused.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => return },
                };
                let index = a.fetch_add(1, Ordering::SeqCst);
                let (fault, random_cut, delay, rate, pause_after, refused) = {
                    let plan = p.lock().expect("plan");
                    let refused = plan.refuse_from.is_some_and(|from| index >= from);
                    (
                        plan.faults.get(&index).copied(),
                        plan.random_cut,
                        plan.delay,
                        plan.rate,
                        plan.pause_after,
                        refused,
                    )
                };
                if refused {
                    b.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let (b, s) = (b.clone(), s.clone());
                let pause =
                    Pause { rx: pause_rx.clone(), tx: pause_tx.clone(), after: pause_after, armed: armed.clone() };
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    relay(client, server, fault, random_cut, Shape { delay, rate }, b, s, pause).await;
                });
            }
        });
        Proxy { addr, plan, paused, pause_armed, accepted, broken, stop }
    }

    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    /// Pauses agent → server traffic once a connection has carried `bytes` upstream
    /// (after the handshake and `Hello`, while chunks flow).
    pub fn pause_after(&self, bytes: u64) {
        self.plan.lock().expect("plan").pause_after = Some(bytes);
    }

    pub fn resume(&self) {
        self.pause_armed.store(false, Ordering::SeqCst);
        self.paused.send_replace(false);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Plans a fault for connection `index` (0-based, in accept order).
    pub fn fault(&self, index: usize, fault: Fault) {
        self.plan.lock().expect("plan").faults.insert(index, fault);
    }

    /// Closes every connection from the `index`-th on (a host that became unreachable).
    pub fn refuse_from(&self, index: usize) {
        self.plan.lock().expect("plan").refuse_from = Some(index);
    }

    /// Stops refusing: new connections go through again.
    pub fn accept_again(&self) {
        self.plan.lock().expect("plan").refuse_from = None;
    }

    pub fn random_cuts(&self, between: Duration, and: Duration) {
        self.plan.lock().expect("plan").random_cut = Some((between, and));
    }

    pub fn shape(&self, delay: Duration, rate: u64) {
        let mut p = self.plan.lock().expect("plan");
        p.delay = delay;
        p.rate = rate;
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Conn {
    up_bytes: AtomicU64,
    blackhole_up: AtomicBool,
    blackhole_down: AtomicBool,
    kill: CancellationToken,
}

#[derive(Clone, Copy)]
struct Shape {
    delay: Duration,
    rate: u64,
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    client: TcpStream,
    server: TcpStream,
    fault: Option<Fault>,
    random_cut: Option<(Duration, Duration)>,
    shape: Shape,
    broken: Arc<AtomicUsize>,
    stop: CancellationToken,
    pause: Pause,
) {
    let Pause { rx: mut paused, tx: pause_tx, after: pause_after, armed } = pause;
    let Shape { delay, rate } = shape;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // A linger of zero turns close into an RST. Only for connections planned to be
    // reset: it also discards unsent data on an ordinary close.
    if matches!(fault, Some(Fault::ResetAfter(_))) || random_cut.is_some() {
        let _ = rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO));
        let _ = rustix::net::sockopt::set_socket_linger(&server, Some(Duration::ZERO));
    }
    let conn = Arc::new(Conn {
        up_bytes: AtomicU64::new(0),
        blackhole_up: AtomicBool::new(false),
        blackhole_down: AtomicBool::new(false),
        kill: stop.child_token(),
    });
    if let Some((lo, hi)) = random_cut {
        let span = hi.saturating_sub(lo).as_millis().max(1) as u64;
        let jitter = Duration::from_millis(rand_u64() % span);
        let (c, b) = (conn.clone(), broken.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(lo + jitter) => {
                    b.fetch_add(1, Ordering::SeqCst);
                    c.kill.cancel();
                }
                _ = c.kill.cancelled() => {}
            }
        });
    }
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let conn = conn.clone();
        let broken = broken.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let before = conn.up_bytes.fetch_add(n as u64, Ordering::SeqCst);
                if let Some(after) = pause_after
                    && before < after
                    && before + n as u64 >= after
                    && armed.swap(false, Ordering::SeqCst)
                {
                    pause_tx.send_replace(true);
                }
                let mut len = n;
                if let Some(f) = fault.filter(|f| !matches!(f, Fault::CutDownAfter(_))) {
                    let limit = match f {
                        Fault::CutAfter(l)
                        | Fault::ResetAfter(l)
                        | Fault::BlackholeDownAfter(l)
                        | Fault::BlackholeUpAfter(l)
                        | Fault::FreezeAfter(l) => l,
                        Fault::CutDownAfter(_) => unreachable!("filtered above"),
                    };
                    if before + n as u64 >= limit && !conn.kill.is_cancelled() {
                        len = limit.saturating_sub(before) as usize;
                        match f {
                            Fault::CutAfter(_) | Fault::ResetAfter(_) => {
                                if len > 0 {
                                    let _ = sw.write_all(&buf[..len]).await;
                                }
                                broken.fetch_add(1, Ordering::SeqCst);
                                conn.kill.cancel();
                                return;
                            }
                            Fault::BlackholeDownAfter(_) => {
                                if !conn.blackhole_down.swap(true, Ordering::SeqCst) {
                                    broken.fetch_add(1, Ordering::SeqCst);
                                }
                                len = n;
                            }
                            Fault::BlackholeUpAfter(_) => {
                                if !conn.blackhole_up.swap(true, Ordering::SeqCst) {
                                    broken.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            Fault::FreezeAfter(_) => {
                                if !conn.blackhole_up.swap(true, Ordering::SeqCst) {
                                    broken.fetch_add(1, Ordering::SeqCst);
                                }
                                conn.blackhole_down.store(true, Ordering::SeqCst);
                            }
                            Fault::CutDownAfter(_) => unreachable!("filtered above"),
                        }
                    }
                }
                if conn.blackhole_up.load(Ordering::SeqCst) {
                    continue;
                }
                if paused.wait_for(|p| !*p).await.is_err() {
                    return;
                }
                pace(delay, rate, len).await;
                if sw.write_all(&buf[..len]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = {
        let conn = conn.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut down_bytes = 0u64;
            loop {
                let mut n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(Fault::CutDownAfter(limit)) = fault
                    && down_bytes + n as u64 >= limit
                {
                    n = limit.saturating_sub(down_bytes) as usize;
                    let _ = cw.write_all(&buf[..n]).await;
                    broken.fetch_add(1, Ordering::SeqCst);
                    conn.kill.cancel();
                    return;
                }
                down_bytes += n as u64;
                if conn.blackhole_down.load(Ordering::SeqCst) {
                    continue;
                }
                pace(delay, rate, n).await;
                if cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = conn.kill.cancelled() => {}
    }
    // Dropping the halves closes both connections (with an RST where lingering was off).
}

async fn pace(delay: Duration, rate: u64, bytes: usize) {
    let mut wait = delay;
    if rate > 0 {
        wait += Duration::from_secs_f64(bytes as f64 / rate as f64);
    }
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    h.finish()
}
