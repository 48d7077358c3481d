//! The command line, one definition for parsing, man pages and completions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit status:
  0    success (every requested backup committed)
  1    a backup or command failed
  2    usage or configuration error
  3    the server could not be reached (or was still restarting) within the retry budget
  4    the server refused (identity, storage, disk full, quota, busy, …)
  130  interrupted (Ctrl-C / SIGTERM)";

const RESTORE_EXIT_CODES: &str = "\
Exit status:
  0    every selected member restored (or, with --dry-run, would be)
  1    the restore failed for another reason (destination unusable, …)
  2    usage or configuration error
  3    the server could not be reached within the retry budget
  4    the server refused (no such archive or entry, identity, …)
  5    nothing restored: the selection matched no member, or none could be written
  6    partial: some members were not restored (existing files kept, refused, failed)
  7    checksum mismatch: the archive is damaged or differs from its manifest (SHA-256);
       files written from it must not be trusted
  130  interrupted (Ctrl-C / SIGTERM)";

const VERIFY_EXIT_CODES: &str = "\
Exit status:
  0    the archive matches its manifest: decompressed to the end, every tar member read
  1    it could not be verified (no manifest, unreadable on the server)
  2    usage or configuration error
  3    the server could not be reached
  4    the server refused (no such archive, a verification already running, …)
  7    corrupt: it differs from its manifest or does not decompress (the server
       quarantined it), or --restore-test restored a file that differs from its
       unchanged source";

const CTL_EXIT_CODES: &str = "\
Exit status:
  0    success
  1    the daemon refused the action (not found, not running, invalid)
  2    usage error
  3    no daemon reachable on the socket
  4    access denied (not root, the daemon's user, or its admin group)";

const CONSOLE_HELP: &str = "\
Keys: ? lists them all (generated from the key map); : opens the command palette;
1-6 or Tab switch views; Enter opens a session; q quits. Every action asks first,
names its target and consequence, and is recorded in the daemon's event log with
your user name. See docs/console.md.

Exit status:
  0    quit by the operator or a signal
  1    the terminal could not be used
  2    usage error (standard output is not a terminal: use --dump or ctl --json)
  3    no daemon reachable on the socket (--dump)
  4    access denied (not root, the daemon's user, or its admin group)";

const DAEMON_EXIT_CODES: &str = "\
Signals: SIGHUP re-reads the configuration (an invalid one is rejected and the running
one kept); SIGTERM / SIGINT stop it within seconds: no new sessions, running ones
aborted explicitly so the other side knows at once, state flushed. Readiness is
reported to systemd (Type=notify) when NOTIFY_SOCKET is set.

Exit status:
  0    stopped by a signal, cleanly
  1    could not start (address in use, certificates unreadable, admin socket taken, …)
  2    usage or configuration error";

#[derive(Debug, Parser)]
#[command(
    name = "nbackup",
    version,
    about = "Streaming client-server backups over mutual TLS",
    long_about = "nbackup streams directories as one tar archive (gzip or zstd) from an agent to a \
                  server over TLS 1.3 with client certificates. The server verifies each archive \
                  end to end (SHA-256), commits it atomically and keeps the newest N per backup.",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificates: create a CA, issue, mint enrollment tokens, list, renew, revoke
    #[command(subcommand)]
    Cert(CertCommand),
    /// Set up this host: a wizard for a server, an agent or both (or --answers FILE);
    /// `setup agent` enrolls an agent with a token from `nbackup cert token`
    #[command(after_help = SETUP_HELP)]
    Setup(SetupArgs),
    /// Run the server in the foreground until Ctrl-C / SIGTERM
    #[command(after_help = DAEMON_EXIT_CODES)]
    Server(ServerArgs),
    /// Run the agent daemon in the foreground: schedules, control channel, admin API
    #[command(after_help = DAEMON_EXIT_CODES)]
    Agent(AgentArgs),
    /// Run backup entries once and exit
    #[command(after_help = EXIT_CODES)]
    Backup(BackupArgs),
    /// Ask the server for its status, version and free space per storage
    #[command(after_help = EXIT_CODES)]
    Health(HealthArgs),
    /// List this agent's archives on the server
    #[command(after_help = EXIT_CODES)]
    List(ListArgs),
    /// List the files in one archive (from its catalog, without reading the archive)
    #[command(after_help = EXIT_CODES)]
    Ls(LsArgs),
    /// Restore files from an archive, verified against its manifest
    #[command(after_help = RESTORE_EXIT_CODES)]
    Restore(RestoreArgs),
    /// Ask the server to verify one of this agent's archives now
    #[command(after_help = VERIFY_EXIT_CODES)]
    Verify(VerifyArgs),
    /// Query and command the daemons running here through their admin API
    #[command(after_help = CTL_EXIT_CODES)]
    Ctl(CtlArgs),
    /// The operator console: live sessions, agents, freshness, history and actions
    #[command(after_help = CONSOLE_HELP)]
    Console(ConsoleArgs),
    /// Back up, verify and restore a tree over loopback with a throwaway PKI and server
    #[command(after_help = EXIT_CODES)]
    Demo(DemoArgs),
    /// Print a shell completion script
    Completions(CompletionsArgs),
    /// Write man pages into a directory
    #[command(hide = true)]
    Man(ManArgs),
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a new CA: DIR/ca.crt and DIR/ca.key (ECDSA P-256)
    InitCa {
        /// Directory to write ca.crt and ca.key into
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Common name of the CA
        #[arg(long, default_value = "nbackup CA")]
        name: String,
        /// Validity in days
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Overwrite existing files
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA: PREFIX.crt and PREFIX.key
    #[command(group = clap::ArgGroup::new("kind").required(true).args(["server", "agent"]))]
    Issue {
        /// Directory holding ca.crt and ca.key
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Server certificate for this DNS name or IP address (repeatable)
        #[arg(long, value_name = "NAME")]
        server: Vec<String>,
        /// Agent certificate for this agent name (must equal agent.name in its config)
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// Path prefix of the files to write (PREFIX.crt, PREFIX.key)
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// Validity in days
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Overwrite existing files
        #[arg(long)]
        force: bool,
    },
    /// Mint a one-time enrollment token for an agent and print the command that
    /// enrolls it (server, with `enrollment` configured; the server must be running)
    Token {
        /// Server configuration file (its admin socket is used)
        #[arg(short, long, value_name = "FILE", env = "NBACKUP_SERVER_CONFIG")]
        config: PathBuf,
        /// The agent's name, as its certificate will carry it
        #[arg(long, value_name = "NAME")]
        agent: String,
        /// How long the token lives (default: enrollment.token_ttl; at most 7d)
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// HOST:PORT the agent dials (default: enrollment.address, else the server
        /// certificate's first name and the listening port)
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List certificates and when they end: a config's own (and, for a server, every
    /// certificate it issued or revoked), or PEM files
    List {
        /// Agent or server configuration file
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// PEM certificate files
        #[arg(value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Revoke certificates; the server refuses them from the next handshake on
    #[command(group = clap::ArgGroup::new("which").required(true).args(["agent", "serial", "cert"]))]
    Revoke {
        /// Server configuration file (its admin socket is used)
        #[arg(short, long, value_name = "FILE", env = "NBACKUP_SERVER_CONFIG")]
        config: PathBuf,
        /// Every unexpired certificate the server issued to this agent
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// The certificate with this serial (hex, colons allowed)
        #[arg(long, value_name = "HEX")]
        serial: Option<String>,
        /// The certificate in this PEM file
        #[arg(long, value_name = "FILE")]
        cert: Option<PathBuf>,
    },
    /// Renew this agent's certificate now over mutual TLS (the agent daemon renews on
    /// its own within tls.renew_before of the end)
    Renew {
        /// Agent configuration file
        #[arg(short, long, value_name = "FILE", env = "NBACKUP_AGENT_CONFIG")]
        config: PathBuf,
    },
}

const SETUP_HELP: &str = "\
Without a subcommand, asks what this host is (server, agent or both), creates or
reuses the CA and certificates, and writes server.yaml / agent.yaml through the same
validation as loading them. An existing config is edited, not replaced: only the keys
asked about change, and the diff is shown before anything is written.

Exit status:
  0    written (or, with --dry-run, planned)
  1    a step failed (certificate, enrollment, file)
  2    usage error, invalid answers, or the plan was declined
  3    the server could not be reached (enrollment)
  4    the server refused (enrollment token)";

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SetupArgs {
    #[command(subcommand)]
    pub command: Option<SetupCommand>,
    /// Take every answer from this file instead of asking (see --print-answers)
    #[arg(long, value_name = "FILE")]
    pub answers: Option<PathBuf>,
    /// Show what would be done (certificates, files, diffs) and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print a commented answers file with every question and its default
    #[arg(long, conflicts_with_all = ["answers", "dry_run"])]
    pub print_answers: bool,
    /// Where the wizard writes configs and certificates (an answers file names its own)
    #[arg(long, value_name = "DIR", default_value = "/etc/nbackup", conflicts_with = "answers")]
    pub dir: std::path::PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum SetupCommand {
    /// Enroll this host as an agent: make its key here, check the server's CA against
    /// the pin, obtain a certificate with the token, and write ca.crt, agent.crt,
    /// agent.key and a working agent.yaml into --dir
    Agent(SetupAgentArgs),
}

#[derive(Debug, Args)]
pub struct SetupAgentArgs {
    /// HOST:PORT of the server, as `nbackup cert token` printed it
    #[arg(long, value_name = "HOST:PORT")]
    pub server: String,
    /// The one-time token
    #[arg(long, value_name = "TOKEN", env = "NBACKUP_ENROLL_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The server CA's pin: sha256:HEX
    #[arg(long, value_name = "PIN")]
    pub ca_pin: String,
    /// This agent's name (default: the host name up to its first dot)
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Name in the server certificate, when it is not the host of --server
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Directory to write into
    #[arg(long, value_name = "DIR", default_value = "/etc/nbackup")]
    pub dir: PathBuf,
    /// Source of the first backup entry in a new agent.yaml (repeatable)
    #[arg(long = "path", value_name = "PATH", default_values_os_t = vec![PathBuf::from("/etc")])]
    pub paths: Vec<PathBuf>,
    /// Storage of that entry (default: the server's first)
    #[arg(long, value_name = "NAME")]
    pub storage: Option<String>,
    /// Schedule of that entry (cron, server-local time of this host)
    #[arg(long, value_name = "CRON", default_value = "0 2 * * *")]
    pub schedule: String,
    /// Replace an existing key and certificate (re-enrollment); agent.yaml is never
    /// overwritten
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Server configuration file
    #[arg(short, long, value_name = "FILE", env = "NBACKUP_SERVER_CONFIG")]
    pub config: PathBuf,
    /// Do not serve the local admin API
    #[arg(long)]
    pub no_admin: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Agent configuration file
    #[arg(short, long, value_name = "FILE", env = "NBACKUP_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Do not serve the local admin API
    #[arg(long)]
    pub no_admin: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Agent configuration file
    #[arg(short, long, value_name = "FILE", env = "NBACKUP_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Run only this entry (repeatable; default: all entries)
    #[arg(short, long = "entry", value_name = "NAME")]
    pub entries: Vec<String>,
    /// Show a progress bar
    #[arg(long, conflicts_with = "json")]
    pub progress: bool,
    /// Print one JSON object per entry on standard output
    #[arg(long)]
    pub json: bool,
    /// More log output on standard error (-v info, -vv debug)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Agent configuration file (for the server address and certificates)
    #[arg(short, long, value_name = "FILE", env = "NBACKUP_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Agent configuration file (server address, certificates, entries)
    #[arg(short, long, value_name = "FILE", env = "NBACKUP_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Only this entry's archives
    #[arg(short, long, value_name = "NAME")]
    pub entry: Option<String>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// Which archive of an entry.
#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// Agent configuration file (server address, certificates, entries)
    #[arg(short, long, value_name = "FILE", env = "NBACKUP_AGENT_CONFIG")]
    pub config: PathBuf,
    /// The backup entry
    #[arg(short, long, value_name = "NAME")]
    pub entry: String,
    /// `latest`, an archive name from `nbackup list`, or a time (`2026-12-01`,
    /// `"2026-12-01 14:30"`, RFC 3339): the newest archive finished by then
    #[arg(long, value_name = "WHEN", default_value = "latest")]
    pub at: String,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Only these paths (and what is below them) or globs (`etc/*.conf`, `**/id_*`)
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// Print JSON (one array of members)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OverwriteArg {
    /// Keep existing files; report them as not restored
    Never,
    /// Replace existing files older than the archived ones
    Older,
    /// Replace existing files
    Always,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Destination directory (created if missing); members land below it by their
    /// stored path (`/etc/hosts` → DIR/etc/hosts)
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Only these paths (and what is below them) or globs (`etc/*.conf`, `**/id_*`)
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// Print what would be written, write nothing (from the catalog when the archive
    /// has one: nothing is downloaded)
    #[arg(long)]
    pub dry_run: bool,
    /// What to do with files that already exist
    #[arg(long, value_enum, default_value = "never")]
    pub overwrite: OverwriteArg,
    /// Show a progress bar
    #[arg(long, conflicts_with = "json")]
    pub progress: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
    /// More log output on standard error (-v info, -vv debug)
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Also restore this many random files of the archive into a temporary directory
    /// and compare them with the live source (files changed since the backup are
    /// reported, not failures)
    #[arg(long, value_name = "FILES", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub restore_test: Option<u32>,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DemoCompression {
    Gzip,
    Zstd,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Tree to back up (default: a small generated sample)
    pub path: Option<PathBuf>,
    /// Keep the PKI, configs, archive and restore in this directory instead of
    /// deleting them
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Compression of the demo storage
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: DemoCompression,
    /// Parallel streams
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallels: u16,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Admin socket (default: the one daemon running here)
    #[arg(long, global = true, value_name = "PATH", env = "NBACKUP_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Status of the daemon
    Status,
    /// Sessions in progress, with their streams (server)
    Sessions,
    /// Agents known from their control channels (server)
    Agents,
    /// Backup entries with schedule, next run and last result (agent)
    Entries,
    /// Finished sessions, newest first (server)
    History {
        /// Only this agent's
        #[arg(long)]
        agent: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Recorded events
    Events {
        /// Only events numbered above this
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Archives on the server
    Archives {
        #[arg(long)]
        agent: Option<String>,
        #[arg(long)]
        backup: Option<String>,
        #[arg(long)]
        storage: Option<String>,
        /// Also those only the storages' buckets hold (lists each entry in each bucket)
        #[arg(long)]
        buckets: bool,
    },
    /// Abort a session (server: SESSION id, or AGENT/ENTRY via the control channel) or an
    /// entry's running backup (agent: ENTRY)
    Abort {
        target: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Close one stream of a session; the agent re-joins it and resends (server)
    Rotate { session: String, stream: u16 },
    /// Run an entry now (agent: ENTRY; server: AGENT/ENTRY via the control channel)
    Run { entry: String },
    /// Postpone an entry's next scheduled run (agent: ENTRY; server: AGENT/ENTRY)
    Defer {
        entry: String,
        #[arg(long)]
        seconds: u64,
    },
    /// Re-read stored archives against their manifests; a corrupt one is quarantined
    /// (server)
    Verify {
        /// AGENT or AGENT/ENTRY (default: every entry)
        target: Option<String>,
        /// Only this storage
        #[arg(long)]
        storage: Option<String>,
        /// Every kept archive, not only each entry's newest
        #[arg(long)]
        all: bool,
        /// Wait for the results and print them; exit 1 if any archive is corrupt or
        /// could not be verified
        #[arg(long)]
        wait: bool,
    },
    /// Copy to buckets what they lack: archives committed before a bucket was
    /// configured, or whose off-site state was lost; ones already in the bucket are
    /// verified, not uploaded again (server)
    Sync {
        /// Only this storage (default: every storage with buckets)
        storage: Option<String>,
        /// Only this bucket
        #[arg(long)]
        bucket: Option<String>,
    },
    /// Send a test message to one of the daemon's `notify:` targets
    NotifyTest { target: String },
    /// Re-read the daemon's configuration
    Reload,
    /// Prometheus metrics (server)
    Metrics,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Admin socket (default: the one daemon running here)
    #[arg(long, value_name = "PATH", env = "NBACKUP_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Hide every action: look, do not touch
    #[arg(long)]
    pub readonly: bool,
    /// No colours (also when NO_COLOR is set); states stay words and glyphs
    #[arg(long)]
    pub no_color: bool,
    /// Print one rendered frame as plain text and exit
    #[arg(long)]
    pub dump: bool,
    /// Size of the --dump frame
    #[arg(long, value_name = "COLSxROWS", default_value = "160x48", value_parser = parse_size)]
    pub size: (u16, u16),
    /// The view to start on: overview, sessions, session (the first, opened), agents, archives,
    /// history, events
    #[arg(long, value_name = "VIEW")]
    pub view: Option<String>,
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or("expected COLSxROWS, like 160x48")?;
    let w: u16 = w.trim().parse().map_err(|_| format!("{w:?} is not a column count"))?;
    let h: u16 = h.trim().parse().map_err(|_| format!("{h:?} is not a row count"))?;
    if !(20..=1000).contains(&w) || !(5..=1000).contains(&h) {
        return Err("between 20x5 and 1000x1000".into());
    }
    Ok((w, h))
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write nbackup.1 and nbackup-COMMAND.1 into
    pub dir: PathBuf,
}
