//! Test harness: a throwaway PKI, an in-process server on 127.0.0.1:0 configured
//! through the real YAML loader, agent configs, the shared dataset generator, and
//! extraction with the system `tar`.

#![allow(dead_code)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use nbackup_daemon::agent::{self, BackupError, BackupReport, Connector, Progress};
use nbackup_daemon::pki::{self, Leaf};
use nbackup_protocol::config::{AgentConfig, Excludes, ServerConfig};
use nbackup_protocol::manifest::Manifest;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Certificates for one test: a CA, a server cert for 127.0.0.1, agent certs.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: pki::CertPair,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = pki::new_ca(&format!("test CA {}", dir.display()), 60).expect("CA");
        pki::write_pair(&dir.join("ca"), &ca, false).expect("write CA");
        let server = pki::issue(&ca, &Leaf::Server(vec!["127.0.0.1".into(), "localhost".into()]), 60).expect("server");
        pki::write_pair(&dir.join("server"), &server, false).expect("write server");
        let pki = Pki { dir: dir.to_path_buf(), ca };
        pki.agent("web-01");
        pki
    }

    /// Issues (once) and returns the prefix of an agent certificate.
    pub fn agent(&self, name: &str) -> PathBuf {
        let prefix = self.dir.join(name);
        if !prefix.with_extension("crt").exists() {
            let pair = pki::issue(&self.ca, &Leaf::Agent(name.into()), 60).expect("agent cert");
            pki::write_pair(&prefix, &pair, false).expect("write agent");
        }
        prefix
    }

    /// A certificate for `name` signed by an unrelated CA.
    pub fn foreign_agent(&self, name: &str) -> PathBuf {
        let other = pki::new_ca("other CA", 2).expect("other CA");
        let pair = pki::issue(&other, &Leaf::Agent(name.into()), 2).expect("foreign cert");
        let prefix = self.dir.join(format!("foreign-{name}"));
        pki::write_pair(&prefix, &pair, true).expect("write foreign");
        prefix
    }
}

/// One storage of a test server.
pub struct StorageSpec {
    pub name: &'static str,
    pub compression: &'static str,
    pub max_backups: u32,
    /// YAML lines appended to the storage's section (indented four spaces).
    pub extra: String,
}

pub fn gzip(name: &'static str) -> StorageSpec {
    StorageSpec { name, compression: "gzip", max_backups: 5, extra: String::new() }
}

pub fn zstd(name: &'static str) -> StorageSpec {
    StorageSpec { name, compression: "zstd", max_backups: 5, extra: String::new() }
}

/// Server YAML listening on `addr` with `storages` under `root/storage/`; `extra` is
/// appended to the `server:` section.
pub fn server_yaml(root: &Path, pki: &Pki, addr: SocketAddr, storages: &[StorageSpec], extra: &str) -> String {
    let mut yaml = format!(
        "server:\n  listen: \"{addr}\"\n{extra}tls:\n  ca_cert: {0}/ca.crt\n  server_cert: {0}/server.crt\n  server_key: {0}/server.key\n\
         state_dir: {1}/state\nadmin:\n  socket: {1}/server.sock\nstorages:\n",
        pki.dir.display(),
        root.display()
    );
    for s in storages {
        yaml.push_str(&format!(
            "  {}:\n    base_dir: {}\n    max_backups: {}\n    compression: {}\n{}",
            s.name,
            root.join("storage").join(s.name).display(),
            s.max_backups,
            s.compression,
            s.extra
        ));
    }
    yaml
}

/// An in-process server on 127.0.0.1:0.
pub struct TestServer {
    pub addr: SocketAddr,
    pub config: ServerConfig,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(root: &Path, pki: &Pki, storages: &[StorageSpec]) -> TestServer {
        Self::start_with(root, pki, storages, "").await
    }

    /// `extra` is appended to the `server:` section (e.g. `  session_ttl: 2s\n`).
    pub async fn start_with(root: &Path, pki: &Pki, storages: &[StorageSpec], extra: &str) -> TestServer {
        Self::start_opts(root, pki, storages, extra, "", false).await
    }

    /// Signing enrollments with the test CA (`enrollment:` section).
    pub async fn start_enrolling(root: &Path, pki: &Pki, storages: &[StorageSpec]) -> TestServer {
        let tail = format!("enrollment:\n  ca_key: {}\n", pki.dir.join("ca.key").display());
        Self::start_opts(root, pki, storages, "", &tail, false).await
    }

    /// Keeping its event log in `<root>/state/server-events.jsonl`, for tests that
    /// read what the server recorded.
    pub async fn start_logged(root: &Path, pki: &Pki, storages: &[StorageSpec]) -> TestServer {
        Self::start_opts(root, pki, storages, "", "", true).await
    }

    /// `extra` goes into the `server:` section, `tail` after everything.
    async fn start_opts(
        root: &Path,
        pki: &Pki,
        storages: &[StorageSpec],
        extra: &str,
        tail: &str,
        persist: bool,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let yaml = server_yaml(root, pki, addr, storages, extra) + tail;
        let path = root.join("server.yaml");
        fs::write(&path, &yaml).expect("write server.yaml");
        let config = ServerConfig::parse(&yaml, &path).expect("server config");
        let shutdown = CancellationToken::new();
        let (cfg, token) = (config.clone(), shutdown.clone());
        let task = tokio::spawn(async move {
            let options = nbackup_daemon::server::Options { persist_state: persist, ..Default::default() };
            nbackup_daemon::server::run_with(cfg, listener, token, options).await.expect("server runs");
        });
        TestServer { addr, config, shutdown, task: Some(task) }
    }

    pub fn storage_dir(&self, name: &str) -> PathBuf {
        self.config.storages.values().find(|s| s.name.as_str() == name).expect("storage").base_dir.clone()
    }

    /// Archives of an entry, oldest first.
    pub fn archives(&self, storage: &str, agent: &str, backup: &str) -> Vec<PathBuf> {
        let dir = self.storage_dir(storage).join(agent).join(backup);
        let mut v: Vec<PathBuf> =
            fs::read_dir(&dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        v.retain(|p| is_archive(p));
        v.sort_by_key(|p| commit_order(&p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
        v
    }

    /// Uploads, journals or temp files left in `.incoming` (the committed log is
    /// state, not a leftover).
    pub fn incoming(&self, storage: &str) -> Vec<PathBuf> {
        fs::read_dir(self.storage_dir(storage).join(".incoming"))
            .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| !p.ends_with("committed.log")).collect())
            .unwrap_or_default()
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
    }

    /// Stops the server gracefully (as `systemctl restart` does) and starts it again
    /// on the same address with the same configuration.
    pub async fn restart(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("server task");
        }
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("rebind the same port");
        self.shutdown = CancellationToken::new();
        let (cfg, token) = (self.config.clone(), self.shutdown.clone());
        self.task = Some(tokio::spawn(async move {
            nbackup_daemon::server::run(cfg, listener, token).await.expect("server runs");
        }));
    }
}

/// One backup entry of a test agent.
pub struct EntrySpec {
    pub name: &'static str,
    pub storage: &'static str,
    pub sources: Vec<PathBuf>,
    pub exclude: Vec<&'static str>,
    pub parallels: u16,
}

pub fn entry(name: &'static str, storage: &'static str, sources: &[&Path]) -> EntrySpec {
    EntrySpec {
        name,
        storage,
        sources: sources.iter().map(|p| p.to_path_buf()).collect(),
        exclude: vec![],
        parallels: 1,
    }
}

/// Agent timing knobs; the defaults keep failing tests fast.
pub struct Tuning {
    pub buffer: &'static str,
    pub chunk: &'static str,
    pub ack_timeout: &'static str,
    pub attempts: u32,
    pub initial_delay: &'static str,
    pub max_delay: &'static str,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            buffer: "16mb",
            chunk: "256kb",
            ack_timeout: "30s",
            attempts: 2,
            initial_delay: "100ms",
            max_delay: "500ms",
        }
    }
}

/// Agent YAML for `name` using certificate `cert` (prefix), talking to `addr`.
pub fn agent_yaml(pki: &Pki, name: &str, cert: &Path, addr: SocketAddr, entries: &[EntrySpec], extra: &str) -> String {
    agent_yaml_tuned(pki, name, cert, addr, entries, &Tuning::default(), extra)
}

pub fn agent_yaml_tuned(
    pki: &Pki,
    name: &str,
    cert: &Path,
    addr: SocketAddr,
    entries: &[EntrySpec],
    t: &Tuning,
    extra: &str,
) -> String {
    let mut yaml = format!(
        "agent:\n  name: {name}\nserver:\n  address: \"{addr}\"\ntls:\n  ca_cert: {}/ca.crt\n  client_cert: {}.crt\n  client_key: {}.key\nbackups:\n",
        pki.dir.display(),
        cert.display(),
        cert.display()
    );
    for e in entries {
        yaml.push_str(&format!(
            "  - name: {}\n    storage: {}\n    parallels: {}\n    sources:\n",
            e.name, e.storage, e.parallels
        ));
        for s in &e.sources {
            yaml.push_str(&format!("      - path: \"{}\"\n", s.display()));
        }
        if !e.exclude.is_empty() {
            yaml.push_str("    exclude:\n");
            for x in &e.exclude {
                yaml.push_str(&format!("      - \"{x}\"\n"));
            }
        }
    }
    yaml.push_str(&format!(
        "resume:\n  buffer_size: {}\n  chunk_size: {}\n  ack_timeout: {}\nretry:\n  max_attempts: {}\n  initial_delay: {}\n  max_delay: {}\n",
        t.buffer, t.chunk, t.ack_timeout, t.attempts, t.initial_delay, t.max_delay
    ));
    yaml.push_str(extra);
    yaml
}

pub fn agent_config_tuned(pki: &Pki, addr: SocketAddr, entries: &[EntrySpec], t: &Tuning) -> AgentConfig {
    let yaml = agent_yaml_tuned(pki, "web-01", &pki.agent("web-01"), addr, entries, t, "");
    AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("agent config")
}

pub fn agent_config(pki: &Pki, addr: SocketAddr, entries: &[EntrySpec]) -> AgentConfig {
    let yaml = agent_yaml(pki, "web-01", &pki.agent("web-01"), addr, entries, "");
    AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("agent config")
}

/// Runs entry `i` of `cfg` once.
pub async fn backup(cfg: &AgentConfig, i: usize) -> Result<BackupReport, BackupError> {
    let connector = Connector::new(cfg).expect("connector");
    agent::run_backup(&connector, cfg, &cfg.backups[i], Arc::new(Progress::default()), CancellationToken::new()).await
}

/// The reproducible dataset from `bench/make-dataset.py` (a copy of the shared one).
pub fn dataset(dir: &Path, size: &str, seed: u32) -> PathBuf {
    let out = Command::new("python3")
        .arg(repo().join("bench/make-dataset.py"))
        .arg(dir)
        .args(["--size", size, "--seed", &seed.to_string()])
        .output()
        .expect("python3 runs the dataset generator");
    assert!(out.status.success(), "make-dataset.py failed: {}", String::from_utf8_lossy(&out.stderr));
    dir.to_path_buf()
}

/// Whether `p` is an archive (not its manifest, catalog or a quarantined file).
pub fn is_archive(p: &Path) -> bool {
    let name = p.to_string_lossy();
    name.ends_with(".tar.gz") || name.ends_with(".tar.zst")
}

/// Extracts an archive with the system GNU tar into `dest`.
pub fn gnu_extract(archive: &Path, dest: &Path) {
    fs::create_dir_all(dest).expect("mkdir");
    let zflag = if archive.to_string_lossy().ends_with(".tar.zst") { "--zstd" } else { "--gzip" };
    let out = Command::new("tar")
        .args([zflag, "-x", "--numeric-owner", "-p", "-f"])
        .arg(archive)
        .arg("-C")
        .arg(dest)
        .output()
        .expect("system tar runs");
    assert!(out.status.success(), "tar failed on {}: {}", archive.display(), String::from_utf8_lossy(&out.stderr));
}

/// Asserts the restored tree equals the sources (metadata included).
pub fn assert_restored(sources: &[PathBuf], excludes: &Excludes, restored: &Path) {
    let as_root = nbackup_daemon::restore::running_as_root();
    let diffs = nbackup_daemon::restore::compare_trees(sources, excludes, restored, as_root, 20).expect("compare");
    assert!(diffs.is_empty(), "restore differs from source:\n  {}", diffs.join("\n  "));
}

/// Checks the archive against its manifest sidecar and returns the manifest.
pub fn check_manifest(archive: &Path) -> Manifest {
    let sidecar = nbackup_daemon::server::storage::sidecar_path(archive);
    let m = Manifest::from_json(&fs::read_to_string(&sidecar).expect("sidecar exists")).expect("manifest parses");
    nbackup_daemon::restore::verify_against_manifest(archive, &m).expect("readable").expect("archive matches manifest");
    m
}

/// A TLS connection to the server as a chosen client: certificate `cert` (prefix;
/// `None` for no client certificate), TLS 1.2 only if `tls12`.
pub async fn raw_tls(
    addr: SocketAddr,
    pki: &Pki,
    cert: Option<&Path>,
    tls12: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.dir.join("ca.crt")).expect("ca") {
        roots.add(c.expect("cert")).expect("add root");
    }
    let versions: &[&rustls::SupportedProtocolVersion] =
        if tls12 { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let builder = rustls::ClientConfig::builder_with_protocol_versions(versions).with_root_certificates(roots);
    let mut cfg = match cert {
        Some(prefix) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(prefix.with_extension("crt"))
                .expect("cert file")
                .collect::<Result<_, _>>()
                .expect("certs");
            let key = PrivateKeyDer::from_pem_file(prefix.with_extension("key")).expect("key");
            builder.with_client_auth_cert(certs, key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![nbackup_protocol::wire::ALPN.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    connector.connect(ServerName::try_from("127.0.0.1").expect("ip name"), tcp).await
}

/// Collects log output of everything running on this thread (the tests' runtimes are
/// single-threaded, so that is the server's connection tasks too).
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = LogWriter(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        (Logs(buf), tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }

    /// Waits until the logs contain `needle` (the server logs from its own tasks).
    pub async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..400 {
            let t = self.text();
            if t.contains(needle) {
                return t;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("logs never contained {needle:?}:\n{}", self.text());
    }
}

#[derive(Clone)]
struct LogWriter(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes a compressor cannot shrink (xorshift), so archiving them takes real time.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// `nbackup server` as a child process, so it can be killed with SIGKILL and started
/// again on the same port and directories.
pub struct ServerChild {
    pub child: std::process::Child,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl ServerChild {
    /// Writes a config for `storages` under `root` on a free port.
    pub fn configure(root: &Path, pki: &Pki, storages: &[StorageSpec], extra: &str) -> (PathBuf, SocketAddr) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let path = root.join("server.yaml");
        fs::write(&path, server_yaml(root, pki, addr, storages, extra)).expect("server.yaml");
        (path, addr)
    }

    /// Starts the server (with `faults` in `NBACKUP_FAULTS`) and waits until it is ready.
    pub fn start(config: &Path, addr: SocketAddr, faults: &str) -> ServerChild {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_nbackup"))
            .args(["server", "--config"])
            .arg(config)
            .env("NBACKUP_FAULTS", faults)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("server starts");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = std::io::BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("server ready") => break,
                Some(Ok(_)) => {}
                _ => panic!("server exited before it was ready"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        ServerChild { child, config: config.to_path_buf(), addr }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (polling) until the process has exited, e.g. after an injected abort.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    pub fn terminate(mut self) {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_child(&self.child), rustix::process::Signal::TERM);
        let _ = self.child.wait();
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uploads, journals or temp files in a storage's `.incoming`.
/// What `.incoming` holds besides the commit log and archives rotated out, which the
/// server frees after answering the commit (see [`rotated_out`]).
pub fn leftovers(storage_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(storage_dir.join(".incoming"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| !p.ends_with("committed.log") && !p.to_string_lossy().ends_with(".rotated"))
                .collect()
        })
        .unwrap_or_default()
}

/// Archives rotated out and not yet freed.
pub fn rotated_out(storage_dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(storage_dir.join(".incoming"))
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.to_string_lossy().ends_with(".rotated")).collect())
        .unwrap_or_default()
}

/// A small tmpfs, unmounted when dropped (also when the test fails).
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts one at `at` if this process may (root, outside a locked-down container).
    pub fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A source of `mib` MiB of incompressible data and one small file.
pub fn noisy_source(tmp: &std::path::Path, mib: usize) -> std::path::PathBuf {
    let src = tmp.join("src");
    fs::create_dir_all(&src).expect("mkdir");
    fs::write(src.join("noise.bin"), noise(mib << 20, 3)).expect("noise");
    fs::write(src.join("small.txt"), b"small\n").expect("small");
    src
}

/// An agent config for one entry with `entry_extra` YAML at entry level
/// (e.g. `    bandwidth_limit: 1mb\n`).
pub fn config_with(
    pki: &Pki,
    addr: std::net::SocketAddr,
    spec: EntrySpec,
    entry_extra: &str,
    tuning: &Tuning,
) -> AgentConfig {
    let yaml = agent_yaml_tuned(pki, "web-01", &pki.agent("web-01"), addr, &[spec], tuning, "");
    // Entry-level keys go right after the entry's `parallels:` line.
    let yaml = yaml.replacen("    sources:\n", &format!("{entry_extra}    sources:\n"), 1);
    AgentConfig::parse(&yaml, std::path::Path::new("agent.yaml")).expect("agent config")
}

/// A `Hello` for opening sessions by hand.
pub fn hello(agent: &str, storage: &str, backup: &str) -> nbackup_protocol::wire::Hello {
    nbackup_protocol::wire::Hello {
        agent: nbackup_protocol::Name::new(agent).expect("name"),
        storage: nbackup_protocol::Name::new(storage).expect("name"),
        backup: nbackup_protocol::Name::new(backup).expect("name"),
        agent_version: "test".into(),
        chunk_size: 1 << 20,
        streams: 2,
    }
}

/// A tmux server of its own (`-L`), so tests never touch the user's sessions.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn start(name: &str, command: &str) -> Tmux {
        let socket = format!("nbackup-test-{}-{name}", std::process::id());
        let t = Tmux { socket };
        let ok = t
            .cmd()
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "console", "-x", "80", "-y", "24"])
            .arg(command)
            .status()
            .expect("tmux runs (install it: .ci/run does)");
        assert!(ok.success(), "tmux new-session");
        t.run(&["set-option", "-t", "console", "remain-on-exit", "on"]);
        t.run(&["resize-window", "-t", "console", "-x", "80", "-y", "24"]);
        t
    }

    pub fn cmd(&self) -> std::process::Command {
        let mut c = std::process::Command::new("tmux");
        c.args(["-L", &self.socket]).env_remove("TMUX");
        c
    }

    pub fn run(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn keys(&self, keys: &[&str]) {
        for k in keys {
            self.run(&["send-keys", "-t", "console", k]);
        }
    }

    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "console"])
    }

    /// Waits until the screen shows `needle`, and returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_until(needle, |s| s.contains(needle))
    }

    pub fn wait_until(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let start = std::time::Instant::now();
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(45), "no {what:?} on the console:\n{s}");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn pane(&self, format: &str) -> String {
        self.run(&["display-message", "-p", "-t", "console", format]).trim().to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// Sort key of an archive name (or a key ending in one) in commit order:
/// `…T120000Z.tar.gz` before `…T120000Z-2.tar.gz`, which a plain byte sort gets
/// wrong ('-' < '.').
pub fn commit_order(name: &str) -> (String, u32) {
    let stem = name.trim_end_matches(".gz").trim_end_matches(".zst").trim_end_matches(".tar");
    match stem.rsplit_once("Z-").map(|(head, n)| (head, n.parse::<u32>())) {
        Some((head, Ok(n))) => (head.to_string(), n),
        _ => (stem.trim_end_matches('Z').to_string(), 1),
    }
}
