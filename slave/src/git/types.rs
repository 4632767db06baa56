use std::fmt;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Remote name used when a request leaves it empty.
pub(super) const DEFAULT_REMOTE: &str = "origin";
/// Branch used when a request leaves it empty (before falling back to the remote's HEAD).
pub(super) const DEFAULT_BRANCH: &str = "master";
/// Shortest abbreviated commit id accepted; shorter ones are too likely to be ambiguous.
pub(super) const MIN_ABBREV_HASH: usize = 7;
/// Longest readable part of a cache directory name (the hash suffix comes on top).
pub(super) const MAX_CACHE_NAME: usize = 64;
/// libgit2 re-invokes the credentials callback after every rejected credential, so without a cap
/// a wrong key or token would loop forever.
pub(super) const MAX_CREDENTIAL_ATTEMPTS: u32 = 6;
/// The command run for network remotes with [`GitTransport::Cli`].
pub(super) const GIT_PROGRAM: &str = "git";
/// Why a network fetch cannot start when the `git` command is missing.
pub(super) const GIT_MISSING: &str = "the git command is needed for https/ssh remotes; install git or build \
                           the slave with the libgit2-network feature";
/// Why a network fetch cannot start with [`GitTransport::Libgit2`] in a default build.
pub(super) const NO_LIBGIT2_NETWORK: &str = "this slave was built without libgit2 network support (cargo \
                                  feature libgit2-network), so git.transport = \"libgit2\" only \
                                  works for local repositories; use git.transport = \"cli\"";
/// Transports the `git` command may use: what [`validate_url`] lets through, so that a remote
/// like `ext::<command>` cannot run commands even where the user's git config would allow it.
pub(super) const CLI_PROTOCOLS: &str = "http:https:ssh:git";
/// Longest part of git's error output kept in an error message (its end, where the cause is).
pub(super) const MAX_GIT_STDERR: usize = 2000;
/// Environment variables that would point the `git` command at another repository than the
/// cache (set when the slave itself runs under git, e.g. from a hook).
pub(super) const REPO_ENV_VARS: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_COMMON_DIR",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
];

/// Errors from fetching or checking out a project. Messages are meant for end users: they end up
/// as the build's error message.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The URL is empty, relative, or uses an unsupported scheme.
    #[error("invalid repository url '{url}': {reason}")]
    InvalidUrl {
        /// The URL as given (credentials redacted).
        url: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The remote name is not a valid git remote name.
    #[error("invalid git remote name '{remote}'")]
    InvalidRemote {
        /// The remote name as given.
        remote: String,
    },
    /// The branch is not a valid git reference name.
    #[error("invalid branch name '{branch}'")]
    InvalidBranch {
        /// The branch as given.
        branch: String,
    },
    /// The commit id is not hexadecimal, too short, too long, or ambiguous.
    #[error("invalid commit hash '{hash}': {reason}")]
    InvalidHash {
        /// The hash as given.
        hash: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Talking to the remote failed (network, authentication, server error…).
    #[error("failed to fetch {url}: {message}")]
    Fetch {
        /// The remote URL (credentials redacted).
        url: String,
        /// What went wrong.
        message: String,
    },
    /// The remote has no such branch (or tag / ref).
    #[error("branch '{branch}' was not found in {url}")]
    BranchNotFound {
        /// The remote URL (credentials redacted).
        url: String,
        /// The branch that was asked for.
        branch: String,
    },
    /// The commit is neither reachable from the fetched branch nor fetchable by id.
    #[error(
        "commit {hash} was not found in {url}: it is not on the requested branch and could not \
         be fetched by id"
    )]
    CommitNotFound {
        /// The remote URL (credentials redacted).
        url: String,
        /// The hash that was asked for.
        hash: String,
    },
    /// The hash names an object that is not a commit (a tree or a blob).
    #[error("{hash} in {url} is a {kind}, not a commit")]
    NotACommit {
        /// The remote URL (credentials redacted).
        url: String,
        /// The hash that was asked for.
        hash: String,
        /// The kind of object it names.
        kind: String,
    },
    /// The local cache repository could not be created, opened or read.
    #[error("git cache error at {path}: {message}")]
    Cache {
        /// The cache repository.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Creating the working copy failed.
    #[error("checkout failed: {message}")]
    Checkout {
        /// What went wrong.
        message: String,
    },
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl GitError {
    pub(super) fn io(context: impl Into<String>, source: io::Error) -> Self {
        GitError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How network remotes (https, http, ssh, git://, `user@host:path`) are fetched. Local paths and
/// `file://` URLs always use libgit2 in process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GitTransport {
    /// The system `git` command, with prompts disabled (the default).
    #[default]
    Cli,
    /// libgit2's own transports; needs a slave built with the `libgit2-network` cargo feature.
    Libgit2,
}

/// Credentials offered to remotes that ask for them, and how network remotes are reached.
///
/// With [`GitTransport::Cli`] the `git` command authenticates, never prompting. SSH: `ssh` with
/// the slave user's agent, keys and `~/.ssh/config`, or only `ssh_key` when set (a key that needs
/// a passphrase must be loaded in the agent; `ssh_key_passphrase` is not used). HTTPS: when
/// `https_token` is set it is sent as basic authentication with `https_username` (through the
/// environment of `git`, never its command line) and credential helpers are not consulted;
/// otherwise the user's git credential helpers answer.
///
/// With [`GitTransport::Libgit2`]: SSH: the ssh-agent is tried first, then `ssh_key` (or
/// `~/.ssh/id_ed25519` and `~/.ssh/id_rsa` when not set). HTTPS: `https_username`/`https_token`
/// when a token is set, then the platform's default credentials (Negotiate/NTLM) where the
/// server allows them.
#[derive(Clone, Default)]
pub struct GitCredentials {
    /// Private key file for ssh remotes.
    pub ssh_key: Option<PathBuf>,
    /// Passphrase of `ssh_key`, if it is encrypted.
    pub ssh_key_passphrase: Option<String>,
    /// User name for https remotes; defaults to the URL's user name or `x-access-token`.
    pub https_username: Option<String>,
    /// Token (or password) for https remotes.
    pub https_token: Option<String>,
    /// How network remotes are fetched.
    pub transport: GitTransport,
}

// Hand-written so that secrets never reach logs through `{:?}`.
impl fmt::Debug for GitCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("GitCredentials")
            .field("ssh_key", &self.ssh_key)
            .field("ssh_key_passphrase", &redacted(&self.ssh_key_passphrase))
            .field("https_username", &self.https_username)
            .field("https_token", &redacted(&self.https_token))
            .field("transport", &self.transport)
            .finish()
    }
}

/// What to fetch: a remote, a branch, optionally a specific commit.
#[derive(Debug, Clone, Copy)]
pub struct FetchRequest<'a> {
    /// Remote URL: `https://…`, `ssh://…`, `user@host:path`, `file:///abs/path` or `/abs/path`.
    pub url: &'a str,
    /// Remote name in the cache repository; `""` means `origin`.
    pub remote: &'a str,
    /// Branch name, tag name or full ref (`refs/heads/x`, `refs/tags/x`, …); `""` means `master`,
    /// or the remote's HEAD when it has no `master`.
    pub branch: &'a str,
    /// Commit to build: `""` means the branch head, otherwise a full or abbreviated (at least 7
    /// hex digits) commit id.
    pub hash: &'a str,
}

/// How one fetch reaches the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    /// libgit2 in process: local repositories, and network ones with [`GitTransport::Libgit2`].
    Libgit2,
    /// The `git` command: network repositories with [`GitTransport::Cli`].
    Cli,
}

/// True for URLs that need a network transport: everything [`validate_url`] accepts except
/// absolute paths and `file://` URLs.
pub(super) fn is_network_url(url: &str) -> bool {
    match url.split_once("://") {
        Some((scheme, _)) => !scheme.eq_ignore_ascii_case("file"),
        None => !url.starts_with('/'),
    }
}

pub(super) fn branch_not_found(shown_url: &str, branch: &str) -> GitError {
    GitError::BranchNotFound {
        url: shown_url.to_owned(),
        branch: if branch.is_empty() {
            DEFAULT_BRANCH.to_owned()
        } else {
            branch.to_owned()
        },
    }
}
