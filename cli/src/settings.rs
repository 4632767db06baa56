//! Settings: TOML file → `ISH_*` environment → flags, merged explicitly, and the cluster secret.
use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Reads a TOML settings file into `T` (unknown keys are errors), or `T::default()` without one.
pub fn load<T: DeserializeOwned + Default>(file: Option<&Path>) -> anyhow::Result<T> {
    let Some(file) = file else {
        return Ok(T::default());
    };
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}

/// `~/x` → `$HOME/x`.
pub fn expand_tilde(p: &Path) -> PathBuf {
    match (p.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => p.to_path_buf(),
    }
}

/// Where a master keeps its generated secret.
pub fn secret_file(data_dir: &Path) -> PathBuf {
    data_dir.join("secret")
}

/// The master's secret: the configured one, else the one kept in its data dir, else a new one
/// written there (mode 0600) so slaves on this host and later restarts find it.
pub fn master_secret(configured: Option<String>, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(s) = configured {
        ish_core::auth::validate_secret(&s)?;
        return Ok(s);
    }
    let file = secret_file(data_dir);
    if let Ok(s) = std::fs::read_to_string(&file) {
        let s = s.trim().to_string();
        ish_core::auth::validate_secret(&s)
            .with_context(|| format!("secret in {}", file.display()))?;
        return Ok(s);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let s = ish_core::auth::generate_secret();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&file)
        .with_context(|| format!("writing {}", file.display()))?;
    f.write_all(s.as_bytes())?;
    tracing::info!(file = %file.display(), "generated a cluster secret; give it to slaves with --secret or ISH_SECRET");
    Ok(s)
}

/// A client's or slave's secret: the configured one, else the secret of a master on this host
/// (its default data dir), else an error saying how to give one.
pub fn client_secret(configured: Option<String>) -> anyhow::Result<String> {
    if let Some(s) = configured {
        ish_core::auth::validate_secret(&s)?;
        return Ok(s);
    }
    let file = secret_file(&ish_master::config::default_home().join("master"));
    match std::fs::read_to_string(&file) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(_) => bail!(
            "no cluster secret: pass --secret or set ISH_SECRET (the master prints where it keeps its secret)"
        ),
    }
}
