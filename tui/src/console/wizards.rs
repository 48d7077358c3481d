//! The wizards the console opens, on a terminal the console has handed over: the
//! prompts of `nbackup setup` (`crate::wizard`), the edit planned by
//! `protocol::setup` (validated as loading, shown as a diff, confirmed), the file
//! written beside the old one and renamed over it, and the daemon reloaded through
//! its admin API. Enrollment mints a token and shows the command for the agent's
//! host.

use std::io::Write;
use std::path::{Path, PathBuf};

use inquire::{Confirm, CustomType, Text};

use nbackup_protocol::admin::TokenRequest;
use nbackup_protocol::setup;

use super::keys::Wizard;
use crate::client::{AdminClient, Status};
use crate::wizard::{self as prompts, WizardError};

/// Runs `w` and says what became of it (for the console's answer box).
pub async fn run(client: &AdminClient, w: Wizard) -> Result<String, String> {
    let result = match w {
        Wizard::Enroll => enroll(client).await,
        Wizard::AddStorage | Wizard::Add => edit(client, true).await,
        Wizard::AddEntry => edit(client, false).await,
    };
    if let Err(e) = &result {
        println!("\n{e}");
    }
    pause();
    result
}

fn pause() {
    print!("\nPress Enter to return to the console. ");
    let _ = std::io::stdout().flush();
    let _ = std::io::stdin().read_line(&mut String::new());
}

fn stopped(e: WizardError) -> String {
    match e {
        WizardError::Cancelled => "cancelled; nothing was changed".into(),
        other => other.to_string(),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, WizardError> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?.map_err(stopped)
}

async fn enroll(client: &AdminClient) -> Result<String, String> {
    println!("Enroll an agent: a one-time token for its name, and the command to run on its host.\n");
    let (agent, minutes) = blocking(|| {
        let name = Text::new("Agent name:")
            .with_validator(|s: &str| {
                Ok(match nbackup_protocol::Name::new(s) {
                    Ok(_) => inquire::validator::Validation::Valid,
                    Err(e) => inquire::validator::Validation::Invalid(e.to_string().into()),
                })
            })
            .prompt()?;
        let minutes = CustomType::<u64>::new("Token valid for (minutes):").with_default(30).prompt()?;
        Ok((name, minutes))
    })
    .await?;
    let agent = nbackup_protocol::Name::new(agent).map_err(|e| e.to_string())?;
    let request = TokenRequest { agent, ttl_secs: Some(minutes.saturating_mul(60)), address: None };
    let issued = client.mint_token(&request).await.map_err(|e| e.to_string())?;
    println!("\nOn {}'s host, run (single use, until {}):\n\n  {}\n", issued.agent, issued.expires_at, issued.command);
    Ok(format!("token for {} minted; it expires at {}", issued.agent, issued.expires_at))
}

async fn edit(client: &AdminClient, server: bool) -> Result<String, String> {
    let status = client.status().await.map_err(|e| e.to_string())?;
    let (config, storages) = match &status {
        Status::Server(s) => (
            s.config.clone(),
            s.storages
                .iter()
                .map(|st| (st.name.clone(), format!("{}, keeps {} per entry", st.compression, st.max_backups)))
                .collect::<Vec<_>>(),
        ),
        Status::Agent(a) => (a.config.clone(), Vec::new()),
    };
    let path = PathBuf::from(config.ok_or("the daemon runs without a config file; nothing to edit")?);
    let before = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = path.clone();
    let text = if server {
        println!("Add a storage to {}.\n", path.display());
        let st = blocking(|| prompts::ask_storage(None, false)).await?;
        setup::with_storage(&before, &file, &st)?
    } else {
        println!("Add a backup entry to {}.\n", path.display());
        let b = blocking(move || prompts::ask_backup(None, &storages, false)).await?;
        setup::with_backup(&before, &file, &b)?
    };
    println!("\nThe change to {}:", path.display());
    for line in similar::TextDiff::from_lines(&before, &text).unified_diff().context_radius(2).to_string().lines() {
        println!("  {line}");
    }
    if !blocking(|| Ok(Confirm::new("Write it and reload the daemon?").with_default(true).prompt()?)).await? {
        return Err("declined; nothing was changed".into());
    }
    replace(&path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let answer = client.reload().await.map_err(|e| format!("written, but the reload failed: {e}"))?;
    println!("{}", answer.message);
    Ok(format!("{} changed; {}", path.display(), answer.message))
}

/// Writes `text` beside `path` and renames it over, keeping the file's mode.
fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("yaml.console-{}", std::process::id()));
    let mode = std::fs::metadata(path)?.permissions();
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::set_permissions(&tmp, mode)?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
