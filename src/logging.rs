//! Log setup: `tracing` to standard error or to a daily-rotated file, as text or JSON.

use nbackup_protocol::config::{LogFormat, LogLevel, Logging};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Who is logging: daemons log at the configured level; one-shot commands keep the
/// terminal for their own output and log warnings unless asked for more (`-v`).
pub enum Mode {
    Daemon,
    Command { verbose: u8 },
}

fn filter(level: &str) -> EnvFilter {
    // RUST_LOG wins so operators can debug one module without editing configs.
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("{level},rustls=warn")))
}

/// Installs the global subscriber. Keep the returned guard alive: it flushes the file
/// writer on drop.
pub fn init(cfg: &Logging, mode: Mode) -> anyhow::Result<Option<tracing_appender::non_blocking::WorkerGuard>> {
    let stderr_level = match mode {
        Mode::Daemon => cfg.level.as_str(),
        Mode::Command { verbose: 0 } => LogLevel::Warn.as_str(),
        Mode::Command { verbose: 1 } => LogLevel::Info.as_str(),
        Mode::Command { .. } => LogLevel::Debug.as_str(),
    };
    let json = cfg.format == LogFormat::Json;
    let mut guard = None;
    let file_layer = match &cfg.file {
        Some(path) => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create log directory {}: {e}", dir.display()))?;
            let prefix = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or("nbackup.log".into());
            let appender = tracing_appender::rolling::Builder::new()
                .rotation(tracing_appender::rolling::Rotation::DAILY)
                .filename_prefix(prefix)
                .max_log_files(14)
                .build(dir)
                .map_err(|e| anyhow::anyhow!("cannot open log file {}: {e}", path.display()))?;
            let (writer, g) = tracing_appender::non_blocking(appender);
            guard = Some(g);
            let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(false);
            let layer: Box<dyn Layer<_> + Send + Sync> = if json { Box::new(layer.json()) } else { Box::new(layer) };
            Some(layer.with_filter(filter(cfg.level.as_str())))
        }
        None => None,
    };
    // With a log file, the terminal only gets warnings (daemons) or what -v asked for.
    let stderr_level = if cfg.file.is_some() && matches!(mode, Mode::Daemon) { "warn" } else { stderr_level };
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let stderr: Box<dyn Layer<_> + Send + Sync> =
        if json && cfg.file.is_none() { Box::new(stderr.json()) } else { Box::new(stderr.with_target(false)) };
    tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr.with_filter(filter(stderr_level)))
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(guard)
}
