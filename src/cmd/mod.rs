//! One module per subcommand.

pub mod agent;
pub mod backup;
pub mod cert;
pub mod console;
pub mod ctl;
pub mod demo;
pub mod docs;
pub mod health;
pub mod restore;
pub mod server;
pub mod setup;

use std::path::Path;

use anyhow::Context;
use nbackup_protocol::config::{AgentConfig, ServerConfig};

use crate::exit::{Exit, fail};

fn read_config(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))
        .map_err(|e| fail(Exit::Usage, e))
}

/// Relative paths inside a config are resolved against its directory; make that
/// directory absolute so daemons do not depend on their working directory.
fn absolute(path: &Path) -> std::path::PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

pub fn load_agent_config(path: &Path) -> anyhow::Result<AgentConfig> {
    let text = read_config(path)?;
    AgentConfig::parse(&text, &absolute(path)).map_err(|e| fail(Exit::Usage, e))
}

pub fn load_server_config(path: &Path) -> anyhow::Result<ServerConfig> {
    let text = read_config(path)?;
    ServerConfig::parse(&text, &absolute(path)).map_err(|e| fail(Exit::Usage, e))
}

/// A multi-threaded runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nbackup-rt")
        .build()
        .context("cannot start the async runtime")
}

/// A token cancelled by the first SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received; shutting down");
        t.cancel();
    });
    token
}

/// A channel that yields once per SIGHUP (reload requests).
pub fn reload_on_sighup() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Tells systemd (`Type=notify`) the daemon is ready; a no-op outside systemd.
pub fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Human-readable byte count (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Megabytes (10^6) per second, the unit throughput is reported in.
pub fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 { 0.0 } else { bytes as f64 / 1e6 / secs }
}

/// A progress bar on standard error with `template` (where `{msg}` is what `update`
/// sets), redrawn every 200 ms by `update(bar, seconds since start)` until the
/// returned token is cancelled.
pub fn progress_bar(
    length: Option<u64>,
    prefix: String,
    template: &str,
    mut update: impl FnMut(&indicatif::ProgressBar, f64) + Send + 'static,
) -> (indicatif::ProgressBar, tokio_util::sync::CancellationToken) {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr_with_hz(5));
    bar.set_style(ProgressStyle::with_template(template).expect("static template is valid").progress_chars("=> "));
    bar.set_prefix(prefix);
    let ticker = tokio_util::sync::CancellationToken::new();
    let (b, t) = (bar.clone(), ticker.clone());
    tokio::spawn(async move {
        let start = std::time::Instant::now();
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        while !t.is_cancelled() {
            tick.tick().await;
            update(&b, start.elapsed().as_secs_f64().max(0.001));
        }
    });
    (bar, ticker)
}
