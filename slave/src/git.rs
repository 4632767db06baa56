//! Fetching git projects on a slave.
//!
//! Every remote URL gets one bare *cache* repository under the slave's cache root. Builds only ever
//! fetch into that cache (never re-clone), and each build gets a fresh, independent working copy
//! cloned locally from the cache (hard links, no network), with HEAD detached at the requested
//! commit and `origin` pointing at the user's URL.
//!
//! How the cache talks to the remote depends on the URL:
//! - local paths and `file://` URLs: libgit2, in process;
//! - network URLs (`https://`, `http://`, `ssh://`, `git://`, `[user@]host:path`): by default
//!   the system `git` command (`git ls-remote`, then `git fetch` into the cache), as cargo does
//!   with `net.git-fetch-with-cli`. That keeps OpenSSL out of the build, and ssh, proxies,
//!   credential helpers and `insteadOf` rules work as they do for `git` on that machine. It never
//!   prompts: anything that would need a human fails with git's message. With
//!   [`GitTransport::Libgit2`] and the `libgit2-network` cargo feature, libgit2's own transports
//!   are used instead.
//!
//! Everything after the fetch (resolving the commit, checkouts) is libgit2.
//!
//! All functions here block; async callers run them in `spawn_blocking`.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use git2::build::{CheckoutBuilder, CloneLocal, RepoBuilder};
use git2::{
    AutotagOption, Cred, CredentialType, Direction, ErrorCode, FetchOptions, FetchPrune,
    ObjectType, Oid, ProxyOptions, Reference, Remote, RemoteCallbacks, Repository,
    RepositoryInitOptions,
};
use serde::{Deserialize, Serialize};

/// Remote name used when a request leaves it empty.
const DEFAULT_REMOTE: &str = "origin";
/// Branch used when a request leaves it empty (before falling back to the remote's HEAD).
const DEFAULT_BRANCH: &str = "master";
/// Shortest abbreviated commit id accepted; shorter ones are too likely to be ambiguous.
const MIN_ABBREV_HASH: usize = 7;
/// Longest readable part of a cache directory name (the hash suffix comes on top).
const MAX_CACHE_NAME: usize = 64;
/// libgit2 re-invokes the credentials callback after every rejected credential, so without a cap
/// a wrong key or token would loop forever.
const MAX_CREDENTIAL_ATTEMPTS: u32 = 6;
/// The command run for network remotes with [`GitTransport::Cli`].
const GIT_PROGRAM: &str = "git";
/// Why a network fetch cannot start when the `git` command is missing.
const GIT_MISSING: &str = "the git command is needed for https/ssh remotes; install git or build \
                           the slave with the libgit2-network feature";
/// Why a network fetch cannot start with [`GitTransport::Libgit2`] in a default build.
const NO_LIBGIT2_NETWORK: &str = "this slave was built without libgit2 network support (cargo \
                                  feature libgit2-network), so git.transport = \"libgit2\" only \
                                  works for local repositories; use git.transport = \"cli\"";
/// Transports the `git` command may use: what [`validate_url`] lets through, so that a remote
/// like `ext::<command>` cannot run commands even where the user's git config would allow it.
const CLI_PROTOCOLS: &str = "http:https:ssh:git";
/// Longest part of git's error output kept in an error message (its end, where the cause is).
const MAX_GIT_STDERR: usize = 2000;
/// Environment variables that would point the `git` command at another repository than the
/// cache (set when the slave itself runs under git, e.g. from a hook).
const REPO_ENV_VARS: &[&str] = &[
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
    fn io(context: impl Into<String>, source: io::Error) -> Self {
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

/// A per-slave cache of bare repositories, one per remote URL.
#[derive(Debug, Clone)]
pub struct RepoCache {
    root: PathBuf,
    creds: GitCredentials,
    /// The `git` command for network remotes (a field so tests can make it missing).
    git_program: PathBuf,
}

impl RepoCache {
    /// A cache rooted at `root` (created on first fetch) using `creds` for authentication.
    pub fn new(root: impl Into<PathBuf>, creds: GitCredentials) -> Self {
        RepoCache {
            root: root.into(),
            creds,
            git_program: PathBuf::from(GIT_PROGRAM),
        }
    }

    /// The directory holding the cache repositories.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The bare cache repository for `url`: a readable name derived from host and path plus a
    /// hash of the full URL, so distinct URLs never share a cache.
    pub fn cache_path(&self, url: &str) -> PathBuf {
        self.root.join(cache_dir_name(url))
    }

    /// Brings the cache for `req.url` up to date with the requested branch and resolves the
    /// requested commit, returning its full 40-hex id.
    ///
    /// The cache repository is created on first use and only fetched into afterwards. A full
    /// `hash` that is already cached is returned without contacting the remote.
    pub fn fetch(&self, req: &FetchRequest<'_>) -> Result<String, GitError> {
        let started = Instant::now();
        validate_url(req.url)?;
        let shown_url = redact_url(req.url);
        let remote_name = if req.remote.is_empty() {
            DEFAULT_REMOTE
        } else {
            req.remote
        };
        if !Remote::is_valid_name(remote_name) {
            return Err(GitError::InvalidRemote {
                remote: req.remote.to_owned(),
            });
        }
        validate_branch(req.branch)?;
        let wanted = HashSpec::parse(req.hash)?;
        let backend = self.backend_for(req.url, &shown_url)?;

        let path = self.cache_path(req.url);
        let lock = path_lock(&path);
        let _guard = lock_ignoring_poison(&lock);

        let (repo, created) = open_or_init_cache(&self.root, &path)?;
        let result = self.fetch_locked(
            &repo,
            &path,
            backend,
            remote_name,
            req,
            wanted.as_ref(),
            &shown_url,
        );
        if result.is_err() && created {
            // A mistyped URL or a first fetch that failed must not leave an empty cache behind.
            drop(repo);
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove new cache");
            }
        }
        let commit = result?;
        tracing::info!(
            url = %shown_url,
            branch = req.branch,
            %commit,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "fetched project"
        );
        Ok(commit.to_string())
    }

    /// Which transport fetches `url`.
    fn backend_for(&self, url: &str, shown_url: &str) -> Result<Backend, GitError> {
        if !is_network_url(url) {
            return Ok(Backend::Libgit2);
        }
        match self.creds.transport {
            GitTransport::Cli => Ok(Backend::Cli),
            GitTransport::Libgit2 if cfg!(feature = "libgit2-network") => Ok(Backend::Libgit2),
            GitTransport::Libgit2 => Err(GitError::Fetch {
                url: shown_url.to_owned(),
                message: NO_LIBGIT2_NETWORK.to_owned(),
            }),
        }
    }

    /// The `git` command working on the cache repository at `path` for `url`.
    fn cli<'a>(&'a self, path: &'a Path, url: &'a str, shown_url: &'a str) -> GitCli<'a> {
        GitCli {
            program: &self.git_program,
            git_dir: path,
            creds: &self.creds,
            url,
            shown_url,
        }
    }

    /// The part of [`RepoCache::fetch`] that runs with the cache locked and opened.
    #[allow(clippy::too_many_arguments)]
    fn fetch_locked(
        &self,
        repo: &Repository,
        path: &Path,
        backend: Backend,
        remote_name: &str,
        req: &FetchRequest<'_>,
        wanted: Option<&HashSpec>,
        shown_url: &str,
    ) -> Result<Oid, GitError> {
        ensure_remote(repo, path, remote_name, req.url)?;
        if let Some(spec @ HashSpec::Full(_)) = wanted
            && let Some(commit) = lookup_commit(repo, shown_url, spec)?
        {
            tracing::debug!(url = %shown_url, %commit, "commit already cached; not fetching");
            return Ok(commit);
        }
        let cli = self.cli(path, req.url, shown_url);
        let fetched = match backend {
            Backend::Libgit2 => {
                self.fetch_branch(repo, path, remote_name, req.branch, shown_url)?
            }
            Backend::Cli => cli.fetch_branch(repo, remote_name, req.branch)?,
        };
        match wanted {
            None => peel_fetched(repo, shown_url, fetched),
            Some(spec) => match lookup_commit(repo, shown_url, spec)? {
                Some(oid) => Ok(oid),
                None => match backend {
                    Backend::Libgit2 => self.fetch_by_id(repo, path, remote_name, spec, shown_url),
                    Backend::Cli => cli.fetch_by_id(repo, remote_name, spec),
                },
            },
        }
    }

    /// Creates a fresh working copy of `commit` (previously fetched from `url`) at `dest`, which
    /// must not exist or be an empty directory.
    ///
    /// The working copy is a regular repository cloned from the cache with hard links, HEAD
    /// detached at `commit`, files checked out, and `origin` set to `url`.
    pub fn checkout(&self, url: &str, commit: &str, dest: &Path) -> Result<(), GitError> {
        let started = Instant::now();
        validate_url(url)?;
        let shown_url = redact_url(url);
        let spec = HashSpec::parse(commit)?.ok_or_else(|| GitError::InvalidHash {
            hash: String::new(),
            reason: "a commit id is required for a checkout".to_owned(),
        })?;
        let dest_existed = check_dest(dest)?;

        let result = self.checkout_inner(url, &shown_url, &spec, dest);
        if result.is_err() {
            cleanup_dest(dest, dest_existed);
        }
        result?;
        tracing::info!(
            url = %shown_url,
            commit,
            dest = %dest.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "checked out project"
        );
        Ok(())
    }

    fn checkout_inner(
        &self,
        url: &str,
        shown_url: &str,
        spec: &HashSpec,
        dest: &Path,
    ) -> Result<(), GitError> {
        let path = self.cache_path(url);
        let lock = path_lock(&path);
        let (oid, workspace) = {
            // Held while objects are copied so a concurrent fetch cannot hand us half-written
            // pack files; released before the (slower) working tree checkout.
            let _guard = lock_ignoring_poison(&lock);
            if !path.exists() {
                return Err(GitError::Checkout {
                    message: format!("{shown_url} has not been fetched on this slave"),
                });
            }
            let cache = Repository::open_bare(&path).map_err(|e| cache_error(&path, &e))?;
            let oid = lookup_commit(&cache, shown_url, spec)?.ok_or_else(|| {
                GitError::CommitNotFound {
                    url: shown_url.to_owned(),
                    hash: spec.text().to_owned(),
                }
            })?;
            drop(cache);

            let mut nothing = CheckoutBuilder::new();
            // The cache's HEAD is meaningless; the real checkout happens below.
            nothing.dry_run();
            let workspace = RepoBuilder::new()
                .bare(false)
                .clone_local(CloneLocal::Local)
                .with_checkout(nothing)
                .clone(path_str(&path)?, dest)
                .map_err(|e| GitError::Checkout {
                    message: format!("cannot clone the cached {shown_url}: {}", describe(&e)),
                })?;
            (oid, workspace)
        };

        let checkout_err = |what: &str, e: git2::Error| GitError::Checkout {
            message: format!("{what} {oid} of {shown_url}: {}", describe(&e)),
        };
        workspace
            .remote_set_url(DEFAULT_REMOTE, url)
            .map_err(|e| checkout_err("cannot set the origin url for", e))?;
        let target = workspace
            .find_commit(oid)
            .map_err(|e| checkout_err("cannot find commit", e))?;
        workspace
            .checkout_tree(target.as_object(), Some(CheckoutBuilder::new().force()))
            .map_err(|e| checkout_err("cannot check out", e))?;
        workspace
            .set_head_detached(oid)
            .map_err(|e| checkout_err("cannot detach HEAD at", e))?;
        Ok(())
    }

    /// Fetches the ref that `branch` designates and returns the id the remote advertised for it.
    fn fetch_branch(
        &self,
        repo: &Repository,
        path: &Path,
        remote_name: &str,
        branch: &str,
        shown_url: &str,
    ) -> Result<Oid, GitError> {
        let fetch_err = |e: git2::Error| GitError::Fetch {
            url: shown_url.to_owned(),
            message: describe(&e),
        };
        let mut remote = repo
            .find_remote(remote_name)
            .map_err(|e| cache_error(path, &e))?;
        let mut conn = remote
            .connect_auth(
                Direction::Fetch,
                Some(remote_callbacks(&self.creds, shown_url)),
                Some(proxy_options()),
            )
            .map_err(fetch_err)?;
        let heads: Vec<(String, Oid)> = conn
            .list()
            .map_err(fetch_err)?
            .iter()
            .map(|h| (h.name().to_owned(), h.oid()))
            .collect();
        let head_target = conn
            .default_branch()
            .ok()
            .and_then(|b| b.as_str().ok().map(str::to_owned));

        let (src, oid) = pick_remote_ref(&heads, head_target.as_deref(), branch)
            .ok_or_else(|| branch_not_found(shown_url, branch))?;
        let refspec = format!("+{src}:{}", local_ref_for(remote_name, &src));
        tracing::debug!(url = %shown_url, %refspec, "fetching");
        // Reusing the open connection saves a second handshake (notably for ssh).
        conn.remote()
            .fetch(&[refspec], Some(&mut self.fetch_options(shown_url)), None)
            .map_err(fetch_err)?;
        Ok(oid)
    }

    /// Asks the remote for a commit by id, for commits not reachable from the fetched branch.
    fn fetch_by_id(
        &self,
        repo: &Repository,
        path: &Path,
        remote_name: &str,
        spec: &HashSpec,
        shown_url: &str,
    ) -> Result<Oid, GitError> {
        let not_found = || GitError::CommitNotFound {
            url: shown_url.to_owned(),
            hash: spec.text().to_owned(),
        };
        // Servers only hand out objects by full id.
        let HashSpec::Full(oid) = spec else {
            return Err(not_found());
        };
        let mut remote = repo
            .find_remote(remote_name)
            .map_err(|e| cache_error(path, &e))?;
        // Anchored under a ref so that a `git gc` of the cache does not drop it.
        let refspec = format!("+{oid}:refs/ish/commits/{oid}");
        tracing::debug!(url = %shown_url, %refspec, "fetching commit by id");
        if let Err(e) = remote.fetch(&[refspec], Some(&mut self.fetch_options(shown_url)), None) {
            tracing::warn!(url = %shown_url, %oid, error = %describe(&e), "fetch by id failed");
            return Err(not_found());
        }
        lookup_commit(repo, shown_url, spec)?.ok_or_else(not_found)
    }

    fn fetch_options(&self, shown_url: &str) -> FetchOptions<'static> {
        let mut fo = FetchOptions::new();
        fo.remote_callbacks(remote_callbacks(&self.creds, shown_url))
            .proxy_options(proxy_options())
            .prune(FetchPrune::Off)
            .update_fetchhead(false)
            .download_tags(AutotagOption::Auto);
        fo
    }
}

/// How one fetch reaches the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// libgit2 in process: local repositories, and network ones with [`GitTransport::Libgit2`].
    Libgit2,
    /// The `git` command: network repositories with [`GitTransport::Cli`].
    Cli,
}

/// True for URLs that need a network transport: everything [`validate_url`] accepts except
/// absolute paths and `file://` URLs.
fn is_network_url(url: &str) -> bool {
    match url.split_once("://") {
        Some((scheme, _)) => !scheme.eq_ignore_ascii_case("file"),
        None => !url.starts_with('/'),
    }
}

fn branch_not_found(shown_url: &str, branch: &str) -> GitError {
    GitError::BranchNotFound {
        url: shown_url.to_owned(),
        branch: if branch.is_empty() {
            DEFAULT_BRANCH.to_owned()
        } else {
            branch.to_owned()
        },
    }
}

/// The `git` command run against one cache repository, for network remotes. It is used like a
/// library: prompts disabled, output captured, secrets passed through its environment.
#[derive(Debug)]
struct GitCli<'a> {
    program: &'a Path,
    git_dir: &'a Path,
    creds: &'a GitCredentials,
    url: &'a str,
    shown_url: &'a str,
}

/// What a finished `git` command left behind.
#[derive(Debug)]
struct CliOutput {
    status: ExitStatus,
    stdout: Vec<u8>,
    /// Cleaned up for messages: secrets redacted, one line, at most [`MAX_GIT_STDERR`] bytes.
    stderr: String,
}

impl GitCli<'_> {
    /// Lists the remote's refs, fetches the one `branch` designates (see [`pick_remote_ref`])
    /// and returns the id it was stored with.
    fn fetch_branch(
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
    fn fetch_by_id(
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
    fn run(&self, args: &[&str]) -> Result<CliOutput, GitError> {
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
    fn command(&self, args: &[&str]) -> Result<Command, GitError> {
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
    fn ssh_command(&self) -> Result<String, GitError> {
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
    fn auth_header(&self) -> Option<String> {
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
    fn secrets(&self) -> Vec<String> {
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
    fn clean_stderr(&self, raw: &[u8]) -> String {
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
    fn failure(&self, output: &CliOutput) -> GitError {
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

    fn hint(&self, stderr: &str) -> Option<String> {
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
fn parse_ls_remote(stdout: &[u8]) -> (Vec<(String, Oid)>, Option<String>) {
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
fn url_userinfo(url: &str) -> Option<(&str, Option<&str>)> {
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
fn redact_text(text: &str, secrets: &[String]) -> String {
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
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Standard base64 (RFC 4648, with padding).
fn base64_encode(bytes: &[u8]) -> String {
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

/// A requested commit id.
#[derive(Debug, Clone)]
enum HashSpec {
    Full(Oid),
    Prefix(String),
}

impl HashSpec {
    fn parse(hash: &str) -> Result<Option<HashSpec>, GitError> {
        let hash = hash.trim();
        if hash.is_empty() {
            return Ok(None);
        }
        let invalid = |reason: &str| GitError::InvalidHash {
            hash: hash.to_owned(),
            reason: reason.to_owned(),
        };
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("a commit id is made of hexadecimal digits"));
        }
        let lower = hash.to_ascii_lowercase();
        match lower.len() {
            40 => Oid::from_str(&lower)
                .map(|oid| Some(HashSpec::Full(oid)))
                .map_err(|e| invalid(e.message())),
            n if n < MIN_ABBREV_HASH => Err(invalid(&format!(
                "at least {MIN_ABBREV_HASH} hexadecimal digits are required"
            ))),
            n if n > 40 => Err(invalid("a commit id has at most 40 hexadecimal digits")),
            _ => Ok(Some(HashSpec::Prefix(lower))),
        }
    }

    fn text(&self) -> String {
        match self {
            HashSpec::Full(oid) => oid.to_string(),
            HashSpec::Prefix(p) => p.clone(),
        }
    }
}

/// Resolves `spec` in `repo` to a commit id; `None` when the object is not there.
fn lookup_commit(
    repo: &Repository,
    shown_url: &str,
    spec: &HashSpec,
) -> Result<Option<Oid>, GitError> {
    let found = match spec {
        HashSpec::Full(oid) => repo.find_object(*oid, None),
        HashSpec::Prefix(prefix) => repo.find_object_by_prefix(prefix, None),
    };
    let object = match found {
        Ok(object) => object,
        Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
        Err(e) if e.code() == ErrorCode::Ambiguous => {
            return Err(GitError::InvalidHash {
                hash: spec.text(),
                reason: "it matches several objects; use more digits".to_owned(),
            });
        }
        Err(e) => {
            return Err(GitError::Cache {
                path: repo.path().to_owned(),
                message: describe(&e),
            });
        }
    };
    // An annotated tag id is as good as the commit it tags.
    match object.peel(ObjectType::Commit) {
        Ok(commit) => Ok(Some(commit.id())),
        Err(_) => Err(GitError::NotACommit {
            url: shown_url.to_owned(),
            hash: spec.text(),
            kind: object
                .kind()
                .map_or_else(|| "unknown object".to_owned(), |k| k.to_string()),
        }),
    }
}

/// The commit a freshly fetched ref points at (peeling annotated tags).
fn peel_fetched(repo: &Repository, shown_url: &str, oid: Oid) -> Result<Oid, GitError> {
    lookup_commit(repo, shown_url, &HashSpec::Full(oid))?.ok_or_else(|| GitError::Fetch {
        url: shown_url.to_owned(),
        message: format!("the remote advertised {oid} but did not send it"),
    })
}

/// Chooses which advertised ref to fetch for `branch`: exact full refs, then `refs/heads/`, then
/// `refs/tags/`; an empty branch means `master`, else whatever the remote's HEAD points at.
fn pick_remote_ref(
    heads: &[(String, Oid)],
    head_target: Option<&str>,
    branch: &str,
) -> Option<(String, Oid)> {
    let find = |name: &str| {
        heads
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, oid)| (n.clone(), *oid))
    };
    if branch.is_empty() {
        return find(&format!("refs/heads/{DEFAULT_BRANCH}"))
            .or_else(|| head_target.and_then(find))
            .or_else(|| find("HEAD"));
    }
    if branch == "HEAD" || branch.starts_with("refs/") {
        return find(branch);
    }
    find(&format!("refs/heads/{branch}")).or_else(|| find(&format!("refs/tags/{branch}")))
}

/// Where a remote ref is stored in the cache: branches as remote-tracking refs, tags as tags,
/// anything else in a private namespace so it cannot clash with either.
fn local_ref_for(remote_name: &str, src: &str) -> String {
    if let Some(branch) = src.strip_prefix("refs/heads/") {
        format!("refs/remotes/{remote_name}/{branch}")
    } else if src.starts_with("refs/tags/") {
        src.to_owned()
    } else if let Some(rest) = src.strip_prefix("refs/") {
        format!("refs/ish/{remote_name}/{rest}")
    } else {
        format!("refs/remotes/{remote_name}/{src}")
    }
}

fn validate_branch(branch: &str) -> Result<(), GitError> {
    if branch.is_empty() || branch == "HEAD" {
        return Ok(());
    }
    let full = if branch.starts_with("refs/") {
        branch.to_owned()
    } else {
        format!("refs/heads/{branch}")
    };
    if Reference::is_valid_name(&full) {
        Ok(())
    } else {
        Err(GitError::InvalidBranch {
            branch: branch.to_owned(),
        })
    }
}

/// Accepts absolute paths, `file://` URLs, network URLs and scp-like `[user@]host:path`.
fn validate_url(url: &str) -> Result<(), GitError> {
    let invalid = |reason: &str| GitError::InvalidUrl {
        url: redact_url(url),
        reason: reason.to_owned(),
    };
    if url.trim().is_empty() {
        return Err(invalid("the url is empty"));
    }
    if url.trim() != url || url.contains(['\n', '\r', '\0']) {
        return Err(invalid("the url contains whitespace or control characters"));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        return match scheme.to_ascii_lowercase().as_str() {
            "file" if rest.starts_with('/') => Ok(()),
            "file" => Err(invalid(
                "file urls must hold an absolute path (file:///path)",
            )),
            "http" | "https" | "ssh" | "git" | "git+ssh" | "ssh+git" if !rest.is_empty() => Ok(()),
            "http" | "https" | "ssh" | "git" | "git+ssh" | "ssh+git" => {
                Err(invalid("the url has no host"))
            }
            _ => Err(invalid(&format!("unsupported url scheme '{scheme}'"))),
        };
    }
    if url.starts_with('/') || is_scp_like(url) {
        return Ok(());
    }
    Err(invalid(
        "relative paths are not allowed; use an absolute path or a file:// url",
    ))
}

/// `[user@]host:path`, as git understands it: a colon before any slash.
fn is_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), slash) => colon > 0 && slash.is_none_or(|s| colon < s),
        (None, _) => false,
    }
}

/// The URL with any password replaced, for messages and logs.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => {
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// `<host and path, sanitized and truncated>-<fnv1a64 of url>.git`.
fn cache_dir_name(url: &str) -> String {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    // Drop user info: it is noise in a directory name and may hold a secret.
    let authority_end = without_scheme.find('/').unwrap_or(without_scheme.len());
    let without_user = match without_scheme[..authority_end].rfind('@') {
        Some(at) => &without_scheme[at + 1..],
        None => without_scheme,
    };
    let trimmed = without_user.trim_end_matches('/');
    let trimmed = trimmed.strip_suffix(".git").unwrap_or(trimmed);

    let mut readable = String::with_capacity(trimmed.len());
    for c in trimmed.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        };
        if !(c == '_' && readable.ends_with('_')) {
            readable.push(c);
        }
    }
    // Leading dots would hide the directory; the tail (repository name) is the telling part.
    let readable = readable.trim_matches(|c| c == '_' || c == '.');
    let readable = &readable[readable.len().saturating_sub(MAX_CACHE_NAME)..];
    let readable = readable.trim_start_matches(['_', '.']);
    let readable = if readable.is_empty() {
        "repo"
    } else {
        readable
    };
    format!("{readable}-{:016x}.git", fnv1a64(url.as_bytes()))
}

/// FNV-1a, 64 bit: stable across builds and platforms, unlike `std`'s hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// Serializes access to one cache repository within this process.
fn path_lock(path: &Path) -> Arc<Mutex<()>> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut locks = lock_ignoring_poison(&LOCKS);
    Arc::clone(locks.entry(path.to_owned()).or_default())
}

/// A panic in another fetch leaves nothing half-done that the next git operation cannot cope
/// with, so a poisoned lock is still usable.
fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the bare cache at `path`, creating it (atomically, via a temporary sibling) if missing
/// and replacing it if it is not a usable repository; also tells whether it was created.
fn open_or_init_cache(root: &Path, path: &Path) -> Result<(Repository, bool), GitError> {
    if path.exists() {
        match Repository::open_bare(path) {
            Ok(repo) => return Ok((repo, false)),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %describe(&e),
                    "cache repository unusable; recreating it"
                );
                std::fs::remove_dir_all(path).map_err(|e| {
                    GitError::io(format!("cannot remove broken cache {}", path.display()), e)
                })?;
            }
        }
    }
    create_private_dir(root)?;

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = root.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut opts = RepositoryInitOptions::new();
    opts.bare(true).mkdir(true).mkpath(false);
    let init = Repository::init_opts(&tmp, &opts)
        .map_err(|e| cache_error(path, &e))
        .and_then(|repo| {
            drop(repo);
            std::fs::rename(&tmp, path)
                .map_err(|e| GitError::io(format!("cannot create cache {}", path.display()), e))
        });
    if let Err(e) = init {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    tracing::info!(path = %path.display(), "created git cache repository");
    let repo = Repository::open_bare(path).map_err(|e| cache_error(path, &e))?;
    Ok((repo, true))
}

/// Adds `name` → `url` to the cache repository, or repoints it.
fn ensure_remote(repo: &Repository, path: &Path, name: &str, url: &str) -> Result<(), GitError> {
    match repo.find_remote(name) {
        Ok(remote) if remote.url_bytes() == url.as_bytes() => Ok(()),
        Ok(_) => repo
            .remote_set_url(name, url)
            .map_err(|e| cache_error(path, &e)),
        Err(e) if e.code() == ErrorCode::NotFound => repo
            .remote(name, url)
            .map(drop)
            .map_err(|e| cache_error(path, &e)),
        Err(e) => Err(cache_error(path, &e)),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), GitError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| GitError::io(format!("cannot create {}", dir.display()), e))
}

/// Checks that `dest` is absent or an empty directory; returns whether it existed.
fn check_dest(dest: &Path) -> Result<bool, GitError> {
    match std::fs::read_dir(dest) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                Err(GitError::Checkout {
                    message: format!("destination {} is not empty", dest.display()),
                })
            } else {
                Ok(true)
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(GitError::io(
            format!("cannot use {} as a checkout destination", dest.display()),
            e,
        )),
    }
}

/// Leaves `dest` as it was before a failed checkout, so a retry can reuse it.
fn cleanup_dest(dest: &Path, existed: bool) {
    let result = if existed {
        std::fs::read_dir(dest).and_then(|entries| {
            entries.into_iter().try_for_each(|entry| {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    std::fs::remove_dir_all(entry.path())
                } else {
                    std::fs::remove_file(entry.path())
                }
            })
        })
    } else {
        std::fs::remove_dir_all(dest)
    };
    if let Err(e) = result
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dest = %dest.display(), error = %e, "cannot clean up failed checkout");
    }
}

fn path_str(path: &Path) -> Result<&str, GitError> {
    path.to_str().ok_or_else(|| GitError::Cache {
        path: path.to_owned(),
        message: "the path is not valid UTF-8".to_owned(),
    })
}

fn cache_error(path: &Path, e: &git2::Error) -> GitError {
    GitError::Cache {
        path: path.to_owned(),
        message: describe(e),
    }
}

/// A git2 error as a sentence (its `Display` appends class and code numbers).
fn describe(e: &git2::Error) -> String {
    let message = e.message().trim().trim_end_matches('.');
    match e.code() {
        ErrorCode::Auth => format!(
            "{message} (check the slave's git credentials: ssh agent or key, or https token)"
        ),
        ErrorCode::Certificate => {
            format!("{message} (for ssh, add the host key to the slave user's ~/.ssh/known_hosts)")
        }
        _ => message.to_owned(),
    }
}

fn proxy_options() -> ProxyOptions<'static> {
    let mut proxy = ProxyOptions::new();
    // Honours http.proxy and the usual *_proxy environment variables.
    proxy.auto();
    proxy
}

fn remote_callbacks(creds: &GitCredentials, shown_url: &str) -> RemoteCallbacks<'static> {
    let mut state = CredentialState::new(creds.clone(), shown_url.to_owned());
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(move |_url, username_from_url, allowed| {
        state.next(username_from_url, allowed)
    });
    callbacks
}

/// One way to authenticate over ssh.
#[derive(Debug)]
enum SshCandidate {
    Agent,
    Key {
        private: PathBuf,
        public: Option<PathBuf>,
    },
}

/// Walks through the configured credentials, one per call, because libgit2 calls back again
/// after each rejection.
#[derive(Debug)]
struct CredentialState {
    creds: GitCredentials,
    shown_url: String,
    attempts: u32,
    ssh: Option<std::vec::IntoIter<SshCandidate>>,
    userpass_tried: bool,
    default_tried: bool,
}

impl CredentialState {
    fn new(creds: GitCredentials, shown_url: String) -> Self {
        CredentialState {
            creds,
            shown_url,
            attempts: 0,
            ssh: None,
            userpass_tried: false,
            default_tried: false,
        }
    }

    fn next(
        &mut self,
        username_from_url: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        self.attempts += 1;
        if self.attempts > MAX_CREDENTIAL_ATTEMPTS {
            return Err(self.give_up(&format!(
                "authentication failed after {MAX_CREDENTIAL_ATTEMPTS} attempts"
            )));
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(&ssh_username(username_from_url));
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            let user = ssh_username(username_from_url);
            let creds = &self.creds;
            let candidates = self
                .ssh
                .get_or_insert_with(|| ssh_candidates(creds).into_iter());
            if let Some(candidate) = candidates.next() {
                tracing::debug!(url = %self.shown_url, ?candidate, "trying ssh credentials");
                return match candidate {
                    SshCandidate::Agent => Cred::ssh_key_from_agent(&user),
                    SshCandidate::Key { private, public } => Cred::ssh_key(
                        &user,
                        public.as_deref(),
                        &private,
                        self.creds.ssh_key_passphrase.as_deref(),
                    ),
                };
            }
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
            && !self.userpass_tried
            && let Some(token) = &self.creds.https_token
        {
            self.userpass_tried = true;
            let user = self
                .creds
                .https_username
                .as_deref()
                .or(username_from_url)
                .unwrap_or("x-access-token");
            return Cred::userpass_plaintext(user, token);
        }
        if allowed.contains(CredentialType::DEFAULT) && !self.default_tried {
            self.default_tried = true;
            return Cred::default();
        }
        Err(self.give_up("authentication failed: no (more) usable credentials configured"))
    }

    fn give_up(&self, what: &str) -> git2::Error {
        git2::Error::new(
            ErrorCode::Auth,
            git2::ErrorClass::Net,
            format!("{what} for {}", self.shown_url),
        )
    }
}

/// The ssh user: the URL's, else the local user (as the `ssh` command would do).
fn ssh_username(username_from_url: Option<&str>) -> String {
    username_from_url
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| "git".to_owned())
}

fn ssh_candidates(creds: &GitCredentials) -> Vec<SshCandidate> {
    let mut candidates = Vec::new();
    // Without a socket the agent attempt can only fail, and it would use up an attempt.
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        candidates.push(SshCandidate::Agent);
    }
    let keys: Vec<PathBuf> = match &creds.ssh_key {
        Some(key) => vec![key.clone()],
        None => std::env::var_os("HOME")
            .map(|home| {
                let ssh_dir = PathBuf::from(home).join(".ssh");
                ["id_ed25519", "id_rsa"]
                    .iter()
                    .map(|name| ssh_dir.join(name))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default(),
    };
    for private in keys {
        let mut public = private.clone().into_os_string();
        public.push(".pub");
        let public = PathBuf::from(public);
        candidates.push(SshCandidate::Key {
            public: public.is_file().then_some(public),
            private,
        });
    }
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;
    use git2::{Signature, Status};
    use std::os::unix::fs::MetadataExt;
    use tempfile::TempDir;

    /// A bare source repository built commit by commit.
    struct Source {
        _dir: TempDir,
        path: PathBuf,
        repo: Repository,
    }

    impl Source {
        fn new() -> Self {
            let dir = TempDir::new().unwrap();
            let path = dir.path().join("project.git");
            let repo = Repository::init_bare(&path).unwrap();
            repo.set_head("refs/heads/master").unwrap();
            Source {
                _dir: dir,
                path,
                repo,
            }
        }

        fn url(&self) -> String {
            self.path.to_str().unwrap().to_owned()
        }

        /// Commits `files` on top of `parent` (keeping its other files) and moves `branch`.
        fn commit(&self, branch: &str, parent: Option<Oid>, files: &[(&str, &str)]) -> Oid {
            let parent = parent.map(|p| self.repo.find_commit(p).unwrap());
            let base = parent.as_ref().map(|p| p.tree().unwrap());
            let mut builder = self.repo.treebuilder(base.as_ref()).unwrap();
            for (name, content) in files {
                let blob = self.repo.blob(content.as_bytes()).unwrap();
                builder.insert(name, blob, 0o100644).unwrap();
            }
            let tree = self.repo.find_tree(builder.write().unwrap()).unwrap();
            let sig = Signature::now("Test", "test@example.com").unwrap();
            let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
            self.repo
                .commit(
                    Some(&format!("refs/heads/{branch}")),
                    &sig,
                    &sig,
                    &format!("commit on {branch}"),
                    &tree,
                    &parents,
                )
                .unwrap()
        }
    }

    /// master: A → B; feature: A → C.
    struct Fixture {
        source: Source,
        a: Oid,
        b: Oid,
        c: Oid,
        _cache_dir: TempDir,
        cache: RepoCache,
    }

    fn fixture() -> Fixture {
        let source = Source::new();
        let a = source.commit("master", None, &[("a.txt", "from A")]);
        let b = source.commit("master", Some(a), &[("b.txt", "from B")]);
        let c = source.commit("feature", Some(a), &[("c.txt", "from C")]);
        let cache_dir = TempDir::new().unwrap();
        let cache = RepoCache::new(cache_dir.path().join("repos"), GitCredentials::default());
        Fixture {
            source,
            a,
            b,
            c,
            _cache_dir: cache_dir,
            cache,
        }
    }

    fn req<'a>(url: &'a str, branch: &'a str, hash: &'a str) -> FetchRequest<'a> {
        FetchRequest {
            url,
            remote: "",
            branch,
            hash,
        }
    }

    #[test]
    fn fetches_branch_heads() {
        let f = fixture();
        let url = f.source.url();
        assert_eq!(f.cache.fetch(&req(&url, "", "")).unwrap(), f.b.to_string());
        assert_eq!(
            f.cache.fetch(&req(&url, "master", "")).unwrap(),
            f.b.to_string()
        );
        assert_eq!(
            f.cache.fetch(&req(&url, "feature", "")).unwrap(),
            f.c.to_string()
        );
        assert_eq!(
            f.cache.fetch(&req(&url, "refs/heads/feature", "")).unwrap(),
            f.c.to_string()
        );
        let cache = Repository::open_bare(f.cache.cache_path(&url)).unwrap();
        let tracked = cache.find_reference("refs/remotes/origin/feature").unwrap();
        assert_eq!(tracked.target(), Some(f.c));
    }

    #[test]
    fn fetch_then_checkout_older_commit() {
        let f = fixture();
        let url = f.source.url();
        let a = f.a.to_string();
        assert_eq!(f.cache.fetch(&req(&url, "master", &a)).unwrap(), a);

        let dest_root = TempDir::new().unwrap();
        let dest = dest_root.path().join("ws");
        f.cache.checkout(&url, &a, &dest).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest.join("a.txt")).unwrap(),
            "from A"
        );
        assert!(!dest.join("b.txt").exists());

        let ws = Repository::open(&dest).unwrap();
        assert!(!ws.is_bare());
        assert!(ws.head_detached().unwrap());
        assert_eq!(ws.head().unwrap().target(), Some(f.a));
        assert_eq!(ws.find_remote("origin").unwrap().url().unwrap(), url);
        let dirty: Vec<_> = ws
            .statuses(None)
            .unwrap()
            .iter()
            .filter(|s| s.status() != Status::CURRENT)
            .map(|s| s.path().unwrap_or_default().to_owned())
            .collect();
        assert!(dirty.is_empty(), "workspace not clean: {dirty:?}");
    }

    #[test]
    fn abbreviated_and_uppercase_hashes() {
        let f = fixture();
        let url = f.source.url();
        let a = f.a.to_string();
        assert_eq!(f.cache.fetch(&req(&url, "master", &a[..7])).unwrap(), a);
        assert_eq!(
            f.cache
                .fetch(&req(&url, "master", &a[..12].to_ascii_uppercase()))
                .unwrap(),
            a
        );
        let dest = TempDir::new().unwrap();
        f.cache.checkout(&url, &a[..9], dest.path()).unwrap();
        assert!(dest.path().join("a.txt").exists());
    }

    #[test]
    fn commit_on_another_branch_is_found() {
        let f = fixture();
        let url = f.source.url();
        let c = f.c.to_string();
        // libgit2's local transport sends the objects of every ref, so C arrives with master;
        // the fetch-by-id fallback is exercised over the smart protocol in `git_daemon_remote`.
        assert_eq!(f.cache.fetch(&req(&url, "master", &c)).unwrap(), c);
        let dest = TempDir::new().unwrap();
        f.cache.checkout(&url, &c, dest.path()).unwrap();
        assert!(dest.path().join("c.txt").exists());
        assert!(!dest.path().join("b.txt").exists());
    }

    #[test]
    fn unknown_hash_is_commit_not_found() {
        let f = fixture();
        let url = f.source.url();
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = f.cache.fetch(&req(&url, "master", missing)).unwrap_err();
        assert!(
            matches!(&err, GitError::CommitNotFound { hash, .. } if hash == missing),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(missing) && msg.contains(&url), "{msg}");

        let err = f.cache.fetch(&req(&url, "master", "deadbeef")).unwrap_err();
        assert!(matches!(err, GitError::CommitNotFound { .. }), "{err:?}");
    }

    #[test]
    fn invalid_hashes_are_rejected() {
        let f = fixture();
        let url = f.source.url();
        for bad in ["abc", "not-a-hash", &"a".repeat(41)] {
            let err = f.cache.fetch(&req(&url, "master", bad)).unwrap_err();
            assert!(
                matches!(err, GitError::InvalidHash { .. }),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn non_commit_hash_is_rejected() {
        let f = fixture();
        let url = f.source.url();
        let tree = f
            .source
            .repo
            .find_commit(f.a)
            .unwrap()
            .tree_id()
            .to_string();
        let err = f.cache.fetch(&req(&url, "master", &tree)).unwrap_err();
        assert!(
            matches!(&err, GitError::NotACommit { kind, .. } if kind == "tree"),
            "{err:?}"
        );
        assert!(err.to_string().contains("not a commit"), "{err}");
    }

    #[test]
    fn unknown_branch_is_branch_not_found() {
        let f = fixture();
        let url = f.source.url();
        let err = f.cache.fetch(&req(&url, "nope", "")).unwrap_err();
        assert!(
            matches!(&err, GitError::BranchNotFound { branch, .. } if branch == "nope"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("branch 'nope' was not found in {url}")
        );
        let err = f.cache.fetch(&req(&url, "bad..name", "")).unwrap_err();
        assert!(matches!(err, GitError::InvalidBranch { .. }), "{err:?}");
    }

    #[test]
    fn tags_and_full_refs() {
        let f = fixture();
        let url = f.source.url();
        let target = f.source.repo.find_object(f.a, None).unwrap();
        let sig = Signature::now("Test", "test@example.com").unwrap();
        f.source
            .repo
            .tag("v1", &target, &sig, "release", false)
            .unwrap();
        f.source
            .repo
            .tag_lightweight("light", &target, false)
            .unwrap();
        let a = f.a.to_string();
        assert_eq!(f.cache.fetch(&req(&url, "v1", "")).unwrap(), a);
        assert_eq!(f.cache.fetch(&req(&url, "refs/tags/v1", "")).unwrap(), a);
        assert_eq!(f.cache.fetch(&req(&url, "light", "")).unwrap(), a);
    }

    #[test]
    fn empty_branch_falls_back_to_remote_head() {
        let source = Source::new();
        let m = source.commit("main", None, &[("m.txt", "main")]);
        source.repo.set_head("refs/heads/main").unwrap();
        let cache_dir = TempDir::new().unwrap();
        let cache = RepoCache::new(cache_dir.path(), GitCredentials::default());
        let url = source.url();
        assert_eq!(cache.fetch(&req(&url, "", "")).unwrap(), m.to_string());
        let err = cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(matches!(err, GitError::BranchNotFound { .. }), "{err:?}");
    }

    #[test]
    fn second_fetch_reuses_cache() {
        let f = fixture();
        let url = f.source.url();
        f.cache.fetch(&req(&url, "master", "")).unwrap();
        let path = f.cache.cache_path(&url);
        let inode = std::fs::metadata(&path).unwrap().ino();
        // An object that exists only in the cache proves the cache was not recreated.
        let marker = Repository::open_bare(&path)
            .unwrap()
            .blob(b"only in the cache")
            .unwrap();

        let d = f.source.commit("master", Some(f.b), &[("d.txt", "from D")]);
        assert_eq!(
            f.cache.fetch(&req(&url, "master", "")).unwrap(),
            d.to_string()
        );
        assert_eq!(f.cache.cache_path(&url), path);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        let cache = Repository::open_bare(&path).unwrap();
        assert!(cache.find_blob(marker).is_ok());
        assert_eq!(std::fs::read_dir(f.cache.root()).unwrap().count(), 1);
    }

    #[test]
    fn file_urls_and_plain_paths() {
        let f = fixture();
        let plain = f.source.url();
        let file_url = format!("file://{plain}");
        let b = f.b.to_string();
        assert_eq!(f.cache.fetch(&req(&file_url, "master", "")).unwrap(), b);
        assert_eq!(f.cache.fetch(&req(&plain, "master", "")).unwrap(), b);
        assert_ne!(f.cache.cache_path(&file_url), f.cache.cache_path(&plain));

        let dest = TempDir::new().unwrap();
        f.cache.checkout(&file_url, &b, dest.path()).unwrap();
        let ws = Repository::open(dest.path()).unwrap();
        assert_eq!(ws.find_remote("origin").unwrap().url().unwrap(), file_url);
        assert!(dest.path().join("b.txt").exists());
    }

    #[test]
    fn relative_and_malformed_urls_are_rejected() {
        let f = fixture();
        for url in [
            "",
            "project.git",
            "./project",
            "../x",
            "~/repo",
            "file://relative/x",
        ] {
            let err = f.cache.fetch(&req(url, "", "")).unwrap_err();
            assert!(matches!(err, GitError::InvalidUrl { .. }), "{url}: {err:?}");
        }
        let err = f.cache.fetch(&req("project.git", "", "")).unwrap_err();
        assert!(
            err.to_string().contains("relative paths are not allowed"),
            "{err}"
        );
        let err = f.cache.fetch(&req("ftp://host/x", "", "")).unwrap_err();
        assert!(err.to_string().contains("unsupported url scheme"), "{err}");
        assert!(
            !f.cache.root().exists(),
            "nothing may be created for bad urls"
        );
    }

    #[test]
    fn unreachable_remote_is_fetch_error() {
        let f = fixture();
        let err = f
            .cache
            .fetch(&req("/nonexistent/ish/repo.git", "", ""))
            .unwrap_err();
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with("failed to fetch /nonexistent"),
            "{err}"
        );
        assert!(
            !f.cache.cache_path("/nonexistent/ish/repo.git").exists(),
            "a failed first fetch must not leave a cache behind"
        );
    }

    /// A `git daemon` serving `base` over the smart protocol, which unlike libgit2's local
    /// transport only sends what is asked for.
    struct Daemon {
        child: std::process::Child,
        port: u16,
    }

    impl Daemon {
        /// Panics when the daemon cannot be started: git is part of every machine this project
        /// supports, so that is a failure, not a reason to skip.
        fn start(base: &Path) -> Daemon {
            use std::net::TcpStream;
            let port = closed_port();
            // `git daemon` would run `git-daemon` as a child of its own, which killing `git`
            // leaves behind; run the real daemon so that `Drop` stops it.
            let exec_path = std::process::Command::new("git")
                .arg("--exec-path")
                .output()
                .unwrap_or_else(|e| panic!("`git --exec-path` could not be run: {e}"));
            assert!(exec_path.status.success(), "{exec_path:?}");
            let exec_path = String::from_utf8(exec_path.stdout).unwrap();
            let mut child =
                std::process::Command::new(Path::new(exec_path.trim()).join("git-daemon"))
                    .arg("--export-all")
                    .arg("--reuseaddr")
                    .arg("--listen=127.0.0.1")
                    .arg(format!("--port={port}"))
                    .arg(format!("--base-path={}", base.display()))
                    .arg(base)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("`git daemon` could not be started: {e}"));
            for _ in 0..400 {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Daemon { child, port };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("`git daemon` exited at once: {status}");
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("`git daemon` did not listen on port {port} within 10 s");
        }

        fn url(&self, name: &str) -> String {
            format!("git://127.0.0.1:{}/{name}", self.port)
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// A local port that nothing listens on (bound, then released).
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn git_daemon_remote() {
        let f = fixture();
        // feature: A → C → D, so that C is reachable but no branch tip.
        let d = f
            .source
            .commit("feature", Some(f.c), &[("d.txt", "from D")]);
        let sig = Signature::now("Test", "test@example.com").unwrap();
        let a_object = f.source.repo.find_object(f.a, None).unwrap();
        f.source
            .repo
            .tag("v1", &a_object, &sig, "release", false)
            .unwrap();
        f.source
            .repo
            .tag_lightweight("light", &a_object, false)
            .unwrap();
        let base = f.source.path.parent().unwrap();
        let daemon = Daemon::start(base);
        let url = daemon.url("project.git");
        let (a, b, c) = (f.a.to_string(), f.b.to_string(), f.c.to_string());

        // Branch heads, by name and full ref.
        assert_eq!(f.cache.fetch(&req(&url, "master", "")).unwrap(), b);
        assert_eq!(f.cache.fetch(&req(&url, "", "")).unwrap(), b);
        assert_eq!(
            f.cache.fetch(&req(&url, "refs/heads/master", "")).unwrap(),
            b
        );
        let path = f.cache.cache_path(&url);
        let cache = Repository::open_bare(&path).unwrap();
        assert_eq!(
            cache
                .find_reference("refs/remotes/origin/master")
                .unwrap()
                .target(),
            Some(f.b)
        );
        // Only what was asked for came over.
        assert!(cache.find_reference("refs/remotes/origin/feature").is_err());
        assert!(cache.find_commit(d).is_err());

        // Tags, annotated (peeled to the commit) and lightweight.
        assert_eq!(f.cache.fetch(&req(&url, "v1", "")).unwrap(), a);
        assert_eq!(f.cache.fetch(&req(&url, "refs/tags/v1", "")).unwrap(), a);
        assert_eq!(f.cache.fetch(&req(&url, "light", "")).unwrap(), a);

        // A commit that is on no fetched branch and no branch tip: fetched by id.
        f.source
            .repo
            .config()
            .unwrap()
            .set_bool("uploadpack.allowReachableSHA1InWant", true)
            .unwrap();
        assert_eq!(f.cache.fetch(&req(&url, "master", &c)).unwrap(), c);
        assert!(
            cache
                .find_reference(&format!("refs/ish/commits/{c}"))
                .is_ok()
        );
        assert!(cache.find_reference("refs/remotes/origin/feature").is_err());
        // Abbreviated ids cannot be asked for, and unknown ones are not there.
        let d_short = d.to_string()[..10].to_owned();
        let err = f.cache.fetch(&req(&url, "master", &d_short)).unwrap_err();
        assert!(
            matches!(&err, GitError::CommitNotFound { hash, .. } if *hash == d_short),
            "{err:?}"
        );
        let missing = "0123456789abcdef0123456789abcdef01234567";
        let err = f.cache.fetch(&req(&url, "master", missing)).unwrap_err();
        assert!(matches!(err, GitError::CommitNotFound { .. }), "{err:?}");

        let dest = TempDir::new().unwrap();
        f.cache.checkout(&url, &c, dest.path()).unwrap();
        assert!(dest.path().join("c.txt").exists());
        assert!(!dest.path().join("d.txt").exists());
        let ws = Repository::open(dest.path()).unwrap();
        assert_eq!(ws.find_remote("origin").unwrap().url().unwrap(), url);

        // Unknown branch, unknown repository.
        let err = f.cache.fetch(&req(&url, "nope", "")).unwrap_err();
        assert!(
            matches!(&err, GitError::BranchNotFound { branch, .. } if branch == "nope"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("branch 'nope' was not found in {url}")
        );
        let missing_repo = daemon.url("missing.git");
        let err = f.cache.fetch(&req(&missing_repo, "", "")).unwrap_err();
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("failed to fetch {missing_repo}: "))
                && msg.contains("missing"),
            "git's own message should be part of the error: {msg}"
        );
        assert!(!msg.contains("fatal:"), "{msg}");
        assert!(!f.cache.cache_path(&missing_repo).exists());

        // A second fetch only fetches into the same cache.
        let inode = std::fs::metadata(&path).unwrap().ino();
        let marker = cache.blob(b"only in the cache").unwrap();
        let e = f.source.commit("master", Some(f.b), &[("e.txt", "from E")]);
        assert_eq!(
            f.cache.fetch(&req(&url, "master", "")).unwrap(),
            e.to_string()
        );
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        let cache = Repository::open_bare(&path).unwrap();
        assert!(cache.find_blob(marker).is_ok());
        assert_eq!(
            std::fs::read_dir(f.cache.root())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path() != f.cache.cache_path(&missing_repo))
                .count(),
            1
        );

        // A full id that is already cached needs no remote at all.
        drop(daemon);
        assert_eq!(f.cache.fetch(&req(&url, "master", &b)).unwrap(), b);
        let err = f.cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
    }

    #[test]
    fn git_daemon_empty_branch_falls_back_to_remote_head() {
        let source = Source::new();
        let m = source.commit("main", None, &[("m.txt", "main")]);
        source.repo.set_head("refs/heads/main").unwrap();
        let daemon = Daemon::start(source.path.parent().unwrap());
        let url = daemon.url("project.git");
        let cache_dir = TempDir::new().unwrap();
        let cache = RepoCache::new(cache_dir.path(), GitCredentials::default());
        assert_eq!(cache.fetch(&req(&url, "", "")).unwrap(), m.to_string());
        let repo = Repository::open_bare(cache.cache_path(&url)).unwrap();
        assert_eq!(
            repo.find_reference("refs/remotes/origin/main")
                .unwrap()
                .target(),
            Some(m)
        );
        let err = cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(matches!(err, GitError::BranchNotFound { .. }), "{err:?}");
        // A remote name other than origin.
        let named = FetchRequest {
            url: &url,
            remote: "upstream",
            branch: "main",
            hash: "",
        };
        assert_eq!(cache.fetch(&named).unwrap(), m.to_string());
        assert!(repo.find_reference("refs/remotes/upstream/main").is_ok());
    }

    #[cfg(feature = "libgit2-network")]
    #[test]
    fn libgit2_transport_over_git_daemon() {
        let f = fixture();
        let daemon = Daemon::start(f.source.path.parent().unwrap());
        let url = daemon.url("project.git");
        let cache_dir = TempDir::new().unwrap();
        let cache = RepoCache::new(
            cache_dir.path(),
            GitCredentials {
                transport: GitTransport::Libgit2,
                ..GitCredentials::default()
            },
        );
        assert_eq!(
            cache.fetch(&req(&url, "master", "")).unwrap(),
            f.b.to_string()
        );
    }

    #[cfg(not(feature = "libgit2-network"))]
    #[test]
    fn libgit2_transport_needs_the_feature() {
        let f = fixture();
        let cache = RepoCache::new(
            f.cache.root(),
            GitCredentials {
                transport: GitTransport::Libgit2,
                ..GitCredentials::default()
            },
        );
        let url = format!("git://127.0.0.1:{}/project.git", closed_port());
        let err = cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        assert!(err.to_string().contains("libgit2-network"), "{err}");
        assert!(!cache.root().exists(), "nothing may be created");
        // Local repositories never needed network support.
        let local = f.source.url();
        assert_eq!(
            cache.fetch(&req(&local, "master", "")).unwrap(),
            f.b.to_string()
        );
    }

    #[test]
    fn http_closed_port_fails_fast_and_readably() {
        let f = fixture();
        let url = format!("http://127.0.0.1:{}/x.git", closed_port());
        let started = Instant::now();
        let err = f.cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with(&format!("failed to fetch {url}: ")) && msg.contains("connect"),
            "{msg}"
        );
        assert!(!f.cache.cache_path(&url).exists());
    }

    #[test]
    fn ssh_closed_port_fails_fast_without_prompting() {
        let f = fixture();
        let cache = RepoCache::new(
            f.cache.root(),
            GitCredentials {
                ssh_key: Some(PathBuf::from("/nonexistent/ish key")),
                ..GitCredentials::default()
            },
        );
        let url = format!("ssh://git@127.0.0.1:{}/x.git", closed_port());
        let started = Instant::now();
        let err = cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        assert!(err.to_string().contains("Connection refused"), "{err}");
    }

    /// An http server that answers every request with 401 and remembers the requests' headers.
    struct HttpStub {
        port: u16,
        requests: Arc<Mutex<Vec<String>>>,
        stop: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl HttpStub {
        fn start() -> HttpStub {
            use std::io::{Read, Write};
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (seen, stopped) = (Arc::clone(&requests), Arc::clone(&stop));
            let thread = std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopped.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(5)));
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    seen.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&request).into_owned());
                    let _ = stream.write_all(
                        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"ish\"\r\n\
                          Content-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            });
            HttpStub {
                port,
                requests,
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for HttpStub {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    #[test]
    fn http_credentials_required_fails_without_prompting() {
        let f = fixture();
        let stub = HttpStub::start();
        let url = format!("http://127.0.0.1:{}/x.git", stub.port);
        let started = Instant::now();
        let err = f.cache.fetch(&req(&url, "master", "")).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let msg = err.to_string();
        assert!(
            msg.contains("terminal prompts disabled") && msg.contains("git.https_token"),
            "{msg}"
        );
        assert!(!stub.requests.lock().unwrap().is_empty());
    }

    #[test]
    fn https_token_is_sent_but_never_shown() {
        const TOKEN: &str = "SECRET-TOKEN-123";
        let f = fixture();
        let cache = RepoCache::new(
            f.cache.root(),
            GitCredentials {
                https_token: Some(TOKEN.to_owned()),
                ..GitCredentials::default()
            },
        );
        let encoded = base64_encode(format!("x-access-token:{TOKEN}").as_bytes());
        let leaks = |text: &str| text.contains(TOKEN) || text.contains(&encoded);

        // The server gets it, as basic authentication, and rejects it.
        let stub = HttpStub::start();
        let url = format!("http://127.0.0.1:{}/x.git", stub.port);
        let err = cache.fetch(&req(&url, "master", "")).unwrap_err();
        let requests = stub
            .requests
            .lock()
            .unwrap()
            .join("\n")
            .to_ascii_lowercase();
        assert!(
            requests.contains(&format!(
                "authorization: basic {}",
                encoded.to_ascii_lowercase()
            )),
            "{requests}"
        );
        for text in [err.to_string(), format!("{err:?}")] {
            assert!(!leaks(&text), "{text}");
            assert!(
                text.contains("did not accept the configured token"),
                "{text}"
            );
        }

        // Nothing listening; the token also in the URL.
        let port = closed_port();
        for url in [
            format!("http://127.0.0.1:{port}/x.git"),
            format!("https://me:{TOKEN}@127.0.0.1:{port}/x.git"),
        ] {
            let err = cache.fetch(&req(&url, "master", "")).unwrap_err();
            assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
            for text in [err.to_string(), format!("{err:?}")] {
                assert!(!leaks(&text), "{text}");
            }
        }

        // Not on the command line either.
        let path = cache.cache_path(&url);
        let command = cache
            .cli(&path, &url, &url)
            .command(&["ls-remote", "--", "origin"])
            .unwrap();
        assert!(
            command.get_args().all(|arg| !leaks(&arg.to_string_lossy())),
            "{command:?}"
        );
        let env: HashMap<String, String> = command
            .get_envs()
            .filter_map(|(k, v)| {
                Some((
                    k.to_string_lossy().into_owned(),
                    v?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let key = env
            .iter()
            .find(|(_, v)| *v == "http.extraHeader")
            .unwrap()
            .0;
        let value = &env[&key.replace("KEY", "VALUE")];
        assert_eq!(value, &format!("Authorization: Basic {encoded}"));
    }

    #[test]
    fn git_command_never_prompts() {
        let cache = RepoCache::new(
            "/cache",
            GitCredentials {
                ssh_key: Some(PathBuf::from("/keys/it's")),
                ..GitCredentials::default()
            },
        );
        let url = "git@host:org/x.git";
        let path = cache.cache_path(url);
        let command = cache
            .cli(&path, url, url)
            .command(&["fetch", "--", "origin"])
            .unwrap();
        let args: Vec<String> = command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[..2],
            ["--git-dir".to_owned(), path.display().to_string()]
        );
        assert!(args.contains(&"core.askPass=".to_owned()), "{args:?}");
        // Without a token the user's credential helpers stay.
        assert!(!args.contains(&"credential.helper=".to_owned()), "{args:?}");
        let env: HashMap<String, Option<String>> = command
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert_eq!(env["GIT_TERMINAL_PROMPT"].as_deref(), Some("0"));
        assert_eq!(env["GIT_ASKPASS"].as_deref(), Some(""));
        assert_eq!(env["SSH_ASKPASS"], None);
        assert_eq!(
            env["GIT_SSH_COMMAND"].as_deref(),
            Some(r"ssh -i '/keys/it'\''s' -o IdentitiesOnly=yes -o BatchMode=yes")
        );
        assert!(!env.contains_key("GIT_CONFIG_COUNT"));
    }

    #[test]
    fn missing_git_command_is_a_clear_error() {
        let f = fixture();
        let mut cache = f.cache.clone();
        cache.git_program = PathBuf::from("/nonexistent/ish-test/git");
        let url = "https://example.invalid/x.git";
        let err = cache.fetch(&req(url, "master", "")).unwrap_err();
        assert!(matches!(err, GitError::Fetch { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("failed to fetch {url}: {GIT_MISSING}")
        );
        assert!(err.to_string().contains("install git"), "{err}");
        assert!(!cache.cache_path(url).exists());
        // Local repositories do not need it.
        let local = f.source.url();
        assert_eq!(
            cache.fetch(&req(&local, "master", "")).unwrap(),
            f.b.to_string()
        );
    }

    #[test]
    fn transport_is_configured_in_lowercase() {
        let parse = |s: &str| serde_json::from_str::<GitTransport>(s);
        assert_eq!(parse("\"cli\"").unwrap(), GitTransport::Cli);
        assert_eq!(parse("\"libgit2\"").unwrap(), GitTransport::Libgit2);
        assert!(parse("\"Cli\"").is_err() && parse("\"ssh\"").is_err());
        assert_eq!(GitTransport::default(), GitTransport::Cli);
        assert_eq!(
            serde_json::to_string(&GitTransport::Libgit2).unwrap(),
            "\"libgit2\""
        );
        assert!(format!("{:?}", GitCredentials::default()).contains("transport: Cli"));
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("x-access-token:SECRET", "eC1hY2Nlc3MtdG9rZW46U0VDUkVU"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), expected, "{input:?}");
        }
        assert_eq!(base64_encode(&[0xfb, 0xff, 0xbf]), "+/+/");
        assert_eq!(base64_encode(&[0, 0, 0, 0]), "AAAAAA==");
    }

    #[test]
    fn git_output_is_cleaned_and_redacted() {
        let secrets = vec!["tok-123".to_owned()];
        assert_eq!(
            redact_text(
                "unable to access 'https://me:pw@h/x/': tok-123; see http://h/ and ssh://git@h/",
                &secrets
            ),
            "unable to access 'https://me:***@h/x/': ***; see http://h/ and ssh://git@h/"
        );
        let creds = GitCredentials {
            https_token: Some("tok-123".to_owned()),
            ..GitCredentials::default()
        };
        let cli = GitCli {
            program: Path::new("git"),
            git_dir: Path::new("/c"),
            creds: &creds,
            url: "https://h/x",
            shown_url: "https://h/x",
        };
        let stderr = b"ssh: connect to host h port 22: Connection refused\r\n\
            fatal: Could not read from remote repository.\n\n\
            Please make sure you have the correct access rights\n\
            and the repository exists.\n";
        assert_eq!(
            cli.clean_stderr(stderr),
            "ssh: connect to host h port 22: Connection refused; Could not read from remote \
             repository. Please make sure you have the correct access rights and the repository \
             exists."
        );
        assert_eq!(cli.clean_stderr(b"error: bad tok-123\n"), "bad ***");
        let long = "x".repeat(3 * MAX_GIT_STDERR) + " the cause";
        let cleaned = cli.clean_stderr(long.as_bytes());
        assert!(cleaned.ends_with("the cause") && cleaned.len() <= MAX_GIT_STDERR + 3);
    }

    #[test]
    fn ls_remote_output_is_parsed() {
        let out = b"ref: refs/heads/main\tHEAD\n\
            1111111111111111111111111111111111111111\tHEAD\n\
            1111111111111111111111111111111111111111\trefs/heads/main\n\
            2222222222222222222222222222222222222222\trefs/tags/v1\n\
            3333333333333333333333333333333333333333\trefs/tags/v1^{}\n\
            abc\trefs/heads/short\n";
        let (heads, head) = parse_ls_remote(out);
        assert_eq!(head.as_deref(), Some("refs/heads/main"));
        let names: Vec<&str> = heads.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["HEAD", "refs/heads/main", "refs/tags/v1", "refs/tags/v1^{}"]
        );
        let (src, _) = pick_remote_ref(&heads, head.as_deref(), "").unwrap();
        assert_eq!(src, "refs/heads/main");
        assert!(is_network_url("git@host:x") && is_network_url("HTTPS://h/x"));
        assert!(!is_network_url("/srv/x") && !is_network_url("FILE:///srv/x"));
    }

    #[test]
    fn checkouts_are_independent() {
        let f = fixture();
        let url = f.source.url();
        let b = f.cache.fetch(&req(&url, "master", "")).unwrap();
        let c = f.cache.fetch(&req(&url, "feature", "")).unwrap();
        let root = TempDir::new().unwrap();
        let (one, two, three) = (
            root.path().join("one"),
            root.path().join("two"),
            root.path().join("three"),
        );
        f.cache.checkout(&url, &b, &one).unwrap();
        f.cache.checkout(&url, &b, &two).unwrap();
        f.cache.checkout(&url, &c, &three).unwrap();

        std::fs::write(one.join("a.txt"), "changed").unwrap();
        assert_eq!(
            std::fs::read_to_string(two.join("a.txt")).unwrap(),
            "from A"
        );
        assert!(three.join("c.txt").exists() && !three.join("b.txt").exists());
        let head = |p: &Path| Repository::open(p).unwrap().head().unwrap().target();
        assert_eq!(head(&one), Some(f.b));
        assert_eq!(head(&three), Some(f.c));
    }

    #[test]
    fn checkout_rejects_non_empty_dest_and_unfetched_repos() {
        let f = fixture();
        let url = f.source.url();
        let b = f.cache.fetch(&req(&url, "master", "")).unwrap();
        let dest = TempDir::new().unwrap();
        std::fs::write(dest.path().join("junk"), "x").unwrap();
        let err = f.cache.checkout(&url, &b, dest.path()).unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert!(
            dest.path().join("junk").exists(),
            "existing files must be left alone"
        );

        let other = Source::new();
        let err = f
            .cache
            .checkout(&other.url(), &b, &dest.path().join("sub"))
            .unwrap_err();
        assert!(err.to_string().contains("has not been fetched"), "{err}");
        assert!(!dest.path().join("sub").exists());
    }

    #[test]
    fn concurrent_fetches_of_one_url() {
        let f = fixture();
        let url = f.source.url();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let cache = f.cache.clone();
                    let url = url.as_str();
                    s.spawn(move || {
                        let branch = if i % 2 == 0 { "master" } else { "feature" };
                        cache.fetch(&req(url, branch, ""))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, result) in results.into_iter().enumerate() {
            let expected = if i % 2 == 0 { f.b } else { f.c };
            assert_eq!(result.unwrap(), expected.to_string());
        }
    }

    #[test]
    fn cache_names_are_readable_and_distinct() {
        let cache = RepoCache::new("/cache", GitCredentials::default());
        let name = |url: &str| {
            cache
                .cache_path(url)
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        let https = name("https://user:secret@github.com/org/my-repo.git");
        assert!(https.starts_with("github.com_org_my-repo-"), "{https}");
        assert!(
            https.ends_with(".git") && !https.contains("secret"),
            "{https}"
        );
        assert!(name("git@github.com:org/repo.git").starts_with("github.com_org_repo-"));
        assert!(name("/srv/git/x").starts_with("srv_git_x-"));
        assert_ne!(name("/srv/a b"), name("/srv/a_b"));
        let long = name(&format!("https://host/{}", "x".repeat(300)));
        assert!(long.len() <= MAX_CACHE_NAME + 21, "{long}");
        assert_eq!(name("/srv/git/x"), name("/srv/git/x"));
        assert!(!name("/.hidden").starts_with('.'));
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn secrets_stay_out_of_messages() {
        assert_eq!(
            redact_url("https://me:tok@host/x.git"),
            "https://me:***@host/x.git"
        );
        assert_eq!(redact_url("ssh://git@host/x"), "ssh://git@host/x");
        let creds = GitCredentials {
            https_token: Some("tok123".to_owned()),
            ssh_key_passphrase: Some("pass456".to_owned()),
            ..GitCredentials::default()
        };
        let shown = format!("{creds:?}");
        assert!(
            !shown.contains("tok123") && !shown.contains("pass456"),
            "{shown}"
        );
    }

    #[test]
    fn credential_callback_gives_up() {
        let creds = GitCredentials {
            https_token: Some("t".to_owned()),
            ..GitCredentials::default()
        };
        let mut state = CredentialState::new(creds, "https://host/x".to_owned());
        let plain = CredentialType::USER_PASS_PLAINTEXT;
        assert!(state.next(None, plain).is_ok());
        let Err(err) = state.next(None, plain) else {
            panic!("a second attempt must fail");
        };
        assert_eq!(err.code(), ErrorCode::Auth);
        assert!(
            err.message().contains("https://host/x"),
            "{}",
            err.message()
        );

        // Even a server that keeps asking for a user name is cut off.
        let mut state = CredentialState::new(GitCredentials::default(), "ssh://h/x".to_owned());
        let outcomes: Vec<bool> = (0..20)
            .map(|_| state.next(None, CredentialType::USERNAME).is_ok())
            .collect();
        assert_eq!(
            outcomes.iter().filter(|ok| **ok).count(),
            MAX_CREDENTIAL_ATTEMPTS as usize
        );
    }
}
