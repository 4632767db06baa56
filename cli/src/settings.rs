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

/// `p` as an absolute path: `~` expanded, a relative path taken from the working directory the
/// role was started in. Nothing is looked up on disk (the path may not exist yet).
pub fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(expand_tilde(p)).with_context(|| format!("making {} absolute", p.display()))
}

/// Settings whose paths must be absolute before a role starts: a role's own directories are
/// handed to commands that run elsewhere (a slave exports `$ARTIFACT_DIR` to atoms that run in
/// the project directory, and git runs in the repo cache with `ssh_key`), so a path relative to
/// where the role was started would name another place, or nothing.
pub trait Paths {
    /// Every path of the settings.
    fn paths(&mut self) -> Vec<&mut PathBuf>;
}

/// Makes every path of `cfg` absolute (see [`absolute`]). Called once, after the settings file,
/// the environment and the flags are merged, so a relative path means the same wherever it was
/// given: relative to the working directory the role was started in.
pub fn resolve_paths<T: Paths>(cfg: &mut T) -> anyhow::Result<()> {
    for p in cfg.paths() {
        *p = absolute(p)?;
    }
    Ok(())
}

impl Paths for ish_master::MasterConfig {
    fn paths(&mut self) -> Vec<&mut PathBuf> {
        vec![&mut self.data_dir]
    }
}

impl Paths for ish_slave::SlaveConfig {
    fn paths(&mut self) -> Vec<&mut PathBuf> {
        let mut v = vec![&mut self.data_dir];
        v.extend(self.git.ssh_key.as_mut());
        v
    }
}

impl Paths for ish_gateway::GatewayConfig {
    fn paths(&mut self) -> Vec<&mut PathBuf> {
        // The gateway keeps nothing on disk.
        Vec::new()
    }
}

impl Paths for crate::local::LocalConfig {
    fn paths(&mut self) -> Vec<&mut PathBuf> {
        vec![&mut self.data_dir]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../conf")
            .join(name)
    }

    /// Every shipped settings file parses into its role's settings (unknown keys are errors), and
    /// uncommenting its documented values changes nothing: the comments tell the truth.
    #[test]
    fn shipped_settings_files_parse_and_document_the_defaults() {
        fn check<T: DeserializeOwned + Default + serde::Serialize>(name: &str) {
            let path = conf(name);
            let parsed: T = load(Some(&path)).unwrap();
            assert_eq!(
                toml::to_string(&parsed).unwrap(),
                toml::to_string(&T::default()).unwrap(),
                "{name}"
            );
            let text = std::fs::read_to_string(&path).unwrap();
            // Uncomment the `# key = value` lines that precede any `# [table]`.
            let mut uncommented = String::new();
            for line in text.lines() {
                let Some(l) = line.strip_prefix("# ") else {
                    continue;
                };
                if l.starts_with('[') {
                    break;
                }
                if let Some((k, _)) = l.split_once(" = ")
                    && !k.is_empty()
                    && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                {
                    uncommented.push_str(l);
                    uncommented.push('\n');
                }
            }
            let value: toml::Table = toml::from_str(&uncommented)
                .unwrap_or_else(|e| panic!("{name}: {e}\n{uncommented}"));
            let defaults: toml::Table =
                toml::from_str(&toml::to_string(&T::default()).unwrap()).unwrap();
            for (k, v) in &value {
                // Paths and CPU counts depend on the machine; optional keys show an example.
                if matches!(k.as_str(), "data_dir" | "executors") || !defaults.contains_key(k) {
                    continue;
                }
                assert_eq!(
                    Some(v),
                    defaults.get(k),
                    "{name}: documented {k} is not the default"
                );
            }
            let _: T = toml::from_str(&uncommented).unwrap();
        }
        check::<ish_master::MasterConfig>("master.toml");
        check::<ish_slave::SlaveConfig>("slave.toml");
        check::<ish_gateway::GatewayConfig>("gateway.toml");
        check::<crate::local::LocalConfig>("local.toml");
        check::<crate::client::ClientConfig>("client.toml");
    }

    /// Every path setting of every role ends up absolute, relative ones taken from the working
    /// directory; and no path-typed setting is missed: each role's settings serialized after
    /// resolution hold no relative path.
    #[test]
    fn relative_paths_of_every_role_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        let rel = PathBuf::from("some/rel");
        let home = PathBuf::from(std::env::var_os("HOME").unwrap());

        let mut m = ish_master::MasterConfig {
            data_dir: rel.clone(),
            ..Default::default()
        };
        resolve_paths(&mut m).unwrap();
        assert_eq!(m.data_dir, cwd.join("some/rel"));

        let mut s = ish_slave::SlaveConfig {
            data_dir: PathBuf::from("./data"),
            ..Default::default()
        };
        s.git.ssh_key = Some(PathBuf::from("~/keys/id"));
        resolve_paths(&mut s).unwrap();
        assert_eq!(s.data_dir, cwd.join("data"));
        assert_eq!(s.git.ssh_key, Some(home.join("keys/id")));

        let mut l = crate::local::LocalConfig {
            data_dir: rel.clone(),
            ..Default::default()
        };
        resolve_paths(&mut l).unwrap();
        assert_eq!(l.data_dir, cwd.join("some/rel"));

        let mut c = crate::client::ClientConfig::default();
        resolve_paths(&mut c).unwrap();
        assert_eq!(c.results_dir, cwd.join("build_results"));

        let mut g = ish_gateway::GatewayConfig::default();
        resolve_paths(&mut g).unwrap();

        // An absolute path is kept as it is.
        let mut m = ish_master::MasterConfig {
            data_dir: PathBuf::from("/srv/ish"),
            ..Default::default()
        };
        resolve_paths(&mut m).unwrap();
        assert_eq!(m.data_dir, PathBuf::from("/srv/ish"));

        // A settings field that holds a path and was left out of `Paths` would stay relative.
        fn no_relative_path<T: serde::Serialize>(cfg: &T) {
            let text = toml::to_string(cfg).unwrap();
            for line in text.lines() {
                if let Some((k, v)) = line.split_once(" = ") {
                    let v = v.trim_matches('"');
                    assert!(
                        !(v.starts_with("some/") || v == "rel-key" || v.starts_with("./")),
                        "{k} = {v} was not resolved"
                    );
                }
            }
        }
        let mut s: ish_slave::SlaveConfig =
            toml::from_str("data_dir = \"./d\"\n[git]\nssh_key = \"rel-key\"\n").unwrap();
        resolve_paths(&mut s).unwrap();
        no_relative_path(&s);
        assert_eq!(s.git.ssh_key, Some(cwd.join("rel-key")));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("ish-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        std::fs::write(&f, "listen = \"x\"\nlisten_adress = \"y\"\n").unwrap();
        let err = load::<ish_master::MasterConfig>(Some(&f)).unwrap_err();
        assert!(format!("{err:#}").contains("listen_adress"), "{err:#}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
