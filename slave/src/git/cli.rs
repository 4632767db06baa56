use std::cmp::Reverse;
use std::io;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

use git2::{Oid, Repository};

use super::fsutil::*;
use super::refs::*;
use super::types::*;

/// The `git` command run against one cache repository, for network remotes. It is used like a
/// library: prompts disabled, output captured, secrets passed through its environment.
#[derive(Debug)]
pub(super) struct GitCli<'a> {
    pub(super) program: &'a Path,
    pub(super) git_dir: &'a Path,
    pub(super) creds: &'a GitCredentials,
    pub(super) url: &'a str,
    pub(super) shown_url: &'a str,
}

/// What a finished `git` command left behind.
#[derive(Debug)]
pub(super) struct CliOutput {
    pub(super) status: ExitStatus,
    pub(super) stdout: Vec<u8>,
    /// Cleaned up for messages: secrets redacted, one line, at most [`MAX_GIT_STDERR`] bytes.
    pub(super) stderr: String,
}

impl GitCli<'_> {
    /// Lists the remote's refs, fetches the one `branch` designates (see [`pick_remote_ref`])
    /// and returns the id it was stored with.
    pub(super) fn fetch_branch(
        &self,
        repo: &Repository,
        remote_name: &str,
        branch: &str,
    ) -> Result<Oid, GitError> {
        let listed = self.run(&["ls-remote", "--symref", "--", remote_name])?;
        if !listed.status.success() {
            return Err(self.failure(&listed));
        }
        let (heads, head_target) = parse_ls_remote(&listed.stdout);
        let (src, _) = pick_remote_ref(&heads, head_target.as_deref(), branch)
            .ok_or_else(|| branch_not_found(self.shown_url, branch))?;
        let dst = local_ref_for(remote_name, &src);
        let refspec = format!("+{src}:{dst}");
        tracing::debug!(url = %self.shown_url, %refspec, "fetching with the git command");
        let fetched = self.run(&[
            "fetch",
            "--no-prune",
            "--no-recurse-submodules",
            "--",
            remote_name,
            &refspec,
        ])?;
        if !fetched.status.success() {
            // The ref went away since it was listed.
            if fetched.stderr.contains("couldn't find remote ref") {
                return Err(branch_not_found(self.shown_url, branch));
            }
            return Err(self.failure(&fetched));
        }
        // What git stored rather than what was listed: the branch may have moved in between.
        repo.refname_to_id(&dst).map_err(|e| GitError::Fetch {
            url: self.shown_url.to_owned(),
            message: format!("git fetch did not store {dst}: {}", describe(&e)),
        })
    }

    /// Asks the remote for a commit by id (servers only hand out objects by full id, and only
    /// when they allow it: protocol v2, or `uploadpack.allow*SHA1InWant`).
    pub(super) fn fetch_by_id(
        &self,
        repo: &Repository,
        remote_name: &str,
        spec: &HashSpec,
    ) -> Result<Oid, GitError> {
        let not_found = || GitError::CommitNotFound {
            url: self.shown_url.to_owned(),
            hash: spec.text(),
        };
        let HashSpec::Full(oid) = spec else {
            return Err(not_found());
        };
        // Anchored under a ref so that a `git gc` of the cache does not drop it.
        let refspec = format!("+{oid}:refs/ish/commits/{oid}");
        tracing::debug!(url = %self.shown_url, %refspec, "fetching commit by id with the git command");
        let fetched = self.run(&[
            "fetch",
            "--no-prune",
            "--no-recurse-submodules",
            "--",
            remote_name,
            &refspec,
        ])?;
        if !fetched.status.success() {
            tracing::warn!(
                url = %self.shown_url,
                %oid,
                error = %fetched.stderr,
                "fetch by id failed"
            );
            return Err(not_found());
        }
        lookup_commit(repo, self.shown_url, spec)?.ok_or_else(not_found)
    }

    /// Runs `git <args>` on the cache and waits for it. Only a `git` that cannot be started is
    /// an error here; callers judge the exit status.
    pub(super) fn run(&self, args: &[&str]) -> Result<CliOutput, GitError> {
        let mut command = self.command(args)?;
        tracing::debug!(url = %self.shown_url, ?args, "running git");
        let output = command.output().map_err(|e| GitError::Fetch {
            url: self.shown_url.to_owned(),
            message: if e.kind() == io::ErrorKind::NotFound {
                GIT_MISSING.to_owned()
            } else {
                format!("cannot run {}: {e}", self.program.display())
            },
        })?;
        Ok(CliOutput {
            status: output.status,
            stdout: output.stdout,
            stderr: self.clean_stderr(&output.stderr),
        })
    }

    /// The command line and environment of `git <args>` (nothing secret on the command line).
    pub(super) fn command(&self, args: &[&str]) -> Result<Command, GitError> {
        let mut command = Command::new(self.program);
        command.arg("--git-dir").arg(self.git_dir);
        // No askpass program (see GIT_ASKPASS below); no automatic gc or maintenance, which may
        // go on in the background while a checkout copies objects out of the cache; no
        // FETCH_HEAD, which nothing reads.
        for setting in [
            "core.askPass=",
            "gc.auto=0",
            "maintenance.auto=false",
            "fetch.writeFetchHead=false",
        ] {
            command.arg("-c").arg(setting);
        }
        let header = self.auth_header();
        if header.is_some() {
            // The configured token is the credential: no helper may pop up or answer instead.
            command.args(["-c", "credential.helper="]);
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in REPO_ENV_VARS {
            command.env_remove(var);
        }
        // git keeps the slave's environment (HOME, an ssh agent, proxies) but not its secrets:
        // nothing git runs (an ssh or credential helper) needs ISH_SECRET.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("ISH_") {
                command.env_remove(var);
            }
        }
        command
            // Never ask anyone anything: where git would prompt it fails with a message. An
            // empty (but set) GIT_ASKPASS also hides core.askPass and SSH_ASKPASS from git.
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "")
            .env_remove("SSH_ASKPASS")
            .env("SSH_ASKPASS_REQUIRE", "never")
            .env("GCM_INTERACTIVE", "never")
            .env("GIT_SSH_COMMAND", self.ssh_command()?)
            .env("GIT_ALLOW_PROTOCOL", CLI_PROTOCOLS)
            // Messages in English, whatever the slave's locale, for logs and the hints below.
            .env("LC_ALL", "C");
        if let Some(header) = header {
            // Through the environment rather than `-c`: every user can read a process's command
            // line (`ps`), only its owner and root its environment. Settings the slave itself
            // got through GIT_CONFIG_COUNT are kept.
            let first = std::env::var("GIT_CONFIG_COUNT")
                .ok()
                .and_then(|n| n.trim().parse::<usize>().ok())
                .unwrap_or(0);
            command
                .env(format!("GIT_CONFIG_KEY_{first}"), "http.extraHeader")
                .env(format!("GIT_CONFIG_VALUE_{first}"), header)
                .env("GIT_CONFIG_COUNT", (first + 1).to_string());
        }
        Ok(command)
    }

    /// `GIT_SSH_COMMAND`: batch mode always, so that a missing key, a passphrase or an unknown
    /// host key fails instead of prompting; only the configured key when there is one.
    pub(super) fn ssh_command(&self) -> Result<String, GitError> {
        let mut ssh = String::from("ssh");
        if let Some(key) = &self.creds.ssh_key {
            let key = key.to_str().ok_or_else(|| GitError::Fetch {
                url: self.shown_url.to_owned(),
                message: format!("the ssh key path {} is not valid UTF-8", key.display()),
            })?;
            ssh.push_str(" -i ");
            ssh.push_str(&shell_quote(key));
            ssh.push_str(" -o IdentitiesOnly=yes");
        }
        ssh.push_str(" -o BatchMode=yes");
        Ok(ssh)
    }

    /// `Authorization: Basic base64(user:token)` when an https token is configured.
    pub(super) fn auth_header(&self) -> Option<String> {
        let token = self
            .creds
            .https_token
            .as_deref()
            .filter(|t| !t.is_empty())?;
        let user = self
            .creds
            .https_username
            .as_deref()
            .filter(|u| !u.is_empty())
            .or_else(|| url_userinfo(self.url).map(|(user, _)| user))
            .filter(|u| !u.is_empty())
            .unwrap_or("x-access-token");
        Some(format!(
            "Authorization: Basic {}",
            base64_encode(format!("{user}:{token}").as_bytes())
        ))
    }

    /// Everything that must not show in a message, longest first (so that a secret containing
    /// another one is replaced whole).
    pub(super) fn secrets(&self) -> Vec<String> {
        let mut secrets: Vec<String> = [
            self.creds.https_token.clone(),
            self.auth_header()
                .and_then(|h| h.rsplit_once(' ').map(|(_, value)| value.to_owned())),
            self.creds.ssh_key_passphrase.clone(),
            url_userinfo(self.url).and_then(|(_, password)| password.map(str::to_owned)),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
        secrets.sort_by_key(|s| Reverse(s.len()));
        secrets
    }

    /// git's error output as one readable line: secrets redacted, `fatal: `/`error: ` dropped,
    /// blank lines skipped, only the end kept when it is long.
    pub(super) fn clean_stderr(&self, raw: &[u8]) -> String {
        let text = redact_text(&String::from_utf8_lossy(raw), &self.secrets());
        let mut out = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let line = ["fatal: ", "error: "]
                .iter()
                .find_map(|prefix| line.strip_prefix(prefix))
                .unwrap_or(line);
            if !out.is_empty() {
                // git wraps long sentences over several lines; other lines are separate messages.
                let continued = out.ends_with(['.', ':', ',', ';', '!', '?'])
                    || line.starts_with(|c: char| c.is_lowercase());
                out.push_str(if continued { " " } else { "; " });
            }
            out.push_str(line);
        }
        if out.len() > MAX_GIT_STDERR {
            let mut start = out.len() - MAX_GIT_STDERR;
            while !out.is_char_boundary(start) {
                start += 1;
            }
            out = format!("…{}", &out[start..]);
        }
        out
    }

    /// The error for a failed `git` command: its message plus, where the cause is recognizable,
    /// what to change on the slave.
    pub(super) fn failure(&self, output: &CliOutput) -> GitError {
        let mut message = if output.stderr.is_empty() {
            format!("git exited with {}", output.status)
        } else {
            output.stderr.clone()
        };
        if let Some(hint) = self.hint(&output.stderr) {
            message.push_str(" (");
            message.push_str(&hint);
            message.push(')');
        }
        GitError::Fetch {
            url: self.shown_url.to_owned(),
            message,
        }
    }

    pub(super) fn hint(&self, stderr: &str) -> Option<String> {
        let s = stderr.to_ascii_lowercase();
        let has = |needles: &[&str]| needles.iter().any(|n| s.contains(n));
        if has(&[
            "terminal prompts disabled",
            "authentication failed",
            "invalid username or password",
        ]) {
            return Some(if self.auth_header().is_some() {
                "the server did not accept the configured token: check git.https_token and \
                 git.https_username in the slave's config"
                    .to_owned()
            } else {
                "the server asks for credentials: set git.https_token in the slave's config, or \
                 configure a git credential helper for the slave's user"
                    .to_owned()
            });
        }
        if has(&[
            "permission denied (publickey",
            "permission denied, please try again",
        ]) {
            let mut hint = "check the slave's ssh credentials: its ssh-agent, git.ssh_key or the \
                            keys in ~/.ssh"
                .to_owned();
            if self.creds.ssh_key_passphrase.is_some() {
                hint.push_str(
                    "; git.ssh_key_passphrase is not used by the git command: load the key into \
                     the slave's ssh-agent",
                );
            }
            return Some(hint);
        }
        if has(&["host key verification failed"]) {
            return Some(
                "add the server's host key to the slave user's ~/.ssh/known_hosts".to_owned(),
            );
        }
        None
    }
}

/// `git ls-remote --symref` output: the advertised refs, and the ref the remote's HEAD points at.
pub(super) fn parse_ls_remote(stdout: &[u8]) -> (Vec<(String, Oid)>, Option<String>) {
    let mut heads = Vec::new();
    let mut head_target = None;
    for line in String::from_utf8_lossy(stdout).lines() {
        let Some((left, name)) = line.split_once('\t') else {
            continue;
        };
        if let Some(target) = left.strip_prefix("ref: ") {
            if name == "HEAD" {
                head_target = Some(target.to_owned());
            }
            continue;
        }
        // `Oid::from_str` would also take (and zero-pad) short hex strings.
        if left.len() == 40
            && left.bytes().all(|b| b.is_ascii_hexdigit())
            && let Ok(oid) = Oid::from_str(left)
        {
            heads.push((name.to_owned(), oid));
        } else {
            tracing::debug!(line, "ignoring unexpected git ls-remote output");
        }
    }
    (heads, head_target)
}

/// The user name and password in a `scheme://user[:password]@host/…` URL.
pub(super) fn url_userinfo(url: &str) -> Option<(&str, Option<&str>)> {
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let (userinfo, _host) = authority.rsplit_once('@')?;
    Some(match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    })
}

/// `text` with every secret, and the password of every `scheme://user:password@` URL, replaced
/// by `***`.
pub(super) fn redact_text(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret.as_str(), "***");
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || matches!(c, '\'' | '"' | '>' | ')'))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rsplit_once('@') {
            Some((userinfo, host)) if userinfo.contains(':') => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                out.push_str(user);
                out.push_str(":***@");
                out.push_str(host);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `s` quoted for a POSIX shell (git runs `GIT_SSH_COMMAND` through `sh`).
pub(super) fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Standard base64 (RFC 4648, with padding).
pub(super) fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
