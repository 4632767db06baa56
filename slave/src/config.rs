//! Slave settings. Every field has a documented default; `conf/slave.toml` shows them all.
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;

/// Settings of the slave role.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlaveConfig {
    /// gRPC URL of the master. Default `http://127.0.0.1:43100`.
    pub master: String,
    /// Number of executors (subjobs run at once). Default: the number of CPUs.
    pub executors: u32,
    /// Directory for the repo cache and build workspaces. Default `~/.ish/slave`. A relative
    /// path is taken from the directory the slave was started in.
    pub data_dir: PathBuf,
    /// Name in the cluster. Default `<hostname>-<pid>`.
    pub name: Option<String>,
    /// Cluster secret (also `--secret` / `ISH_SECRET`). Required.
    pub secret: Option<String>,
    /// Free-form labels reported to the master.
    pub labels: HashMap<String, String>,
    /// Time between TERM and KILL when stopping a build's processes, in milliseconds. Default 3000.
    pub kill_grace_ms: u64,
    /// Longest wait between two attempts to reach the master, in milliseconds. Default 5000.
    pub max_reconnect_delay_ms: u64,
    /// The master is considered gone after this long without a message from it, in
    /// milliseconds. Default 20000.
    pub master_timeout_ms: u64,
    /// Console bytes kept per atom: past it the start is dropped and only the tail (between half
    /// and all of this) is kept, with a note saying how much was cut. Default 64 MiB.
    pub max_console_bytes_per_atom: u64,
    /// Largest atomizer output accepted, in bytes. Default 64 MiB.
    pub max_atomizer_output: usize,
    /// On shutdown (SIGTERM), how long running subjobs may take to finish before they are
    /// stopped and handed back to the master, in milliseconds. Default 30000.
    pub shutdown_grace_ms: u64,
    /// How long `teardown_build` may run on shutdown, in milliseconds. Default 30000.
    pub shutdown_teardown_ms: u64,
    /// Largest file a build's `remote_files` may download, in bytes. Default 256 MiB.
    pub remote_file_max_bytes: u64,
    /// Longest a `remote_files` download may take, in milliseconds. Default 300000.
    pub remote_file_timeout_ms: u64,
    /// Variables of the slave's own environment passed to every command, besides the fixed
    /// allow-list (`PATH`, `HOME`, `USER`, `LOGNAME`, `SHELL`, `LANG`, `LANGUAGE`, `LC_*`, `TZ`,
    /// `TMPDIR`, `TERM`). Nothing else of the slave's environment reaches a command; `ISH_*`
    /// names are refused. Default empty.
    pub pass_env: Vec<String>,
    /// Credentials for git remotes.
    pub git: GitConfig,
}

/// Credentials for git remotes (ssh agent and default keys are always tried), and how network
/// remotes are fetched.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitConfig {
    /// Private key for ssh remotes. Default: ssh-agent, then `~/.ssh/id_ed25519`, `~/.ssh/id_rsa`.
    /// With the `cli` transport, setting it makes ssh offer only this key.
    pub ssh_key: Option<PathBuf>,
    /// Passphrase of `ssh_key`. Only the `libgit2` transport uses it; with `cli` (which never
    /// prompts), load an encrypted key into the slave's ssh-agent instead.
    pub ssh_key_passphrase: Option<String>,
    /// User name for https remotes. Default: the URL's user, or `x-access-token`.
    pub https_username: Option<String>,
    /// Token or password for https remotes. With the `cli` transport it is handed to git as an
    /// `Authorization` header through its environment (never its command line), and the slave
    /// user's git credential helpers are then not consulted.
    pub https_token: Option<String>,
    /// How https, http, ssh and git:// remotes are fetched:
    /// - `"cli"` (default): the system `git` command (needs git installed; uses the slave user's
    ///   git and ssh configuration, never prompts);
    /// - `"libgit2"`: libgit2's own transports; only in slaves built with the `libgit2-network`
    ///   cargo feature (which needs OpenSSL headers and pkg-config to build).
    ///
    /// Local paths and `file://` urls always use libgit2 in process.
    pub transport: crate::git::GitTransport,
}

impl Default for SlaveConfig {
    fn default() -> Self {
        Self {
            master: "http://127.0.0.1:43100".into(),
            executors: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            data_dir: std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."))
                .join(".ish")
                .join("slave"),
            name: None,
            secret: None,
            labels: HashMap::new(),
            kill_grace_ms: 3_000,
            max_reconnect_delay_ms: 5_000,
            master_timeout_ms: 20_000,
            max_console_bytes_per_atom: 64 << 20,
            max_atomizer_output: 64 << 20,
            shutdown_grace_ms: 30_000,
            shutdown_teardown_ms: 30_000,
            remote_file_max_bytes: 256 << 20,
            remote_file_timeout_ms: 300_000,
            pass_env: Vec::new(),
            git: GitConfig::default(),
        }
    }
}

impl SlaveConfig {
    /// Makes `data_dir` and `git.ssh_key` absolute (relative ones are taken from the working
    /// directory now). Paths under `data_dir` reach commands that run elsewhere — atoms get
    /// `$ARTIFACT_DIR` and run in the project directory, git runs in the repo cache with
    /// `ssh_key` — so a relative one would name another place there.
    pub fn make_paths_absolute(&mut self) -> std::io::Result<()> {
        self.data_dir = std::path::absolute(&self.data_dir)?;
        if let Some(k) = &mut self.git.ssh_key {
            *k = std::path::absolute(&*k)?;
        }
        Ok(())
    }

    /// The configured name, or `<hostname>-<pid>`.
    pub fn effective_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "slave".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

impl From<&GitConfig> for crate::git::GitCredentials {
    fn from(g: &GitConfig) -> Self {
        Self {
            ssh_key: g.ssh_key.clone(),
            ssh_key_passphrase: g.ssh_key_passphrase.clone(),
            https_username: g.https_username.clone(),
            https_token: g.https_token.clone(),
            transport: g.transport,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_made_absolute_from_the_working_directory() {
        let cwd = std::env::current_dir().unwrap();
        let mut cfg = SlaveConfig {
            data_dir: PathBuf::from("rel/data"),
            ..Default::default()
        };
        cfg.git.ssh_key = Some(PathBuf::from("keys/id"));
        cfg.make_paths_absolute().unwrap();
        assert_eq!(cfg.data_dir, cwd.join("rel/data"));
        assert_eq!(cfg.git.ssh_key, Some(cwd.join("keys/id")));
        let mut cfg = SlaveConfig {
            data_dir: PathBuf::from("/srv/ish/slave"),
            ..Default::default()
        };
        cfg.make_paths_absolute().unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/ish/slave"));
        assert_eq!(cfg.git.ssh_key, None);
    }
}
