use std::path::{Path, PathBuf};
use std::time::Instant;

use git2::build::{CheckoutBuilder, CloneLocal, RepoBuilder};
use git2::{AutotagOption, Direction, FetchOptions, FetchPrune, Oid, Remote, Repository};

use super::cli::*;
use super::creds::*;
use super::fsutil::*;
use super::refs::*;
use super::types::*;

/// A per-slave cache of bare repositories, one per remote URL.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub(super) root: PathBuf,
    pub(super) creds: GitCredentials,
    /// The `git` command for network remotes (a field so tests can make it missing).
    pub(super) git_program: PathBuf,
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
    pub(super) fn backend_for(&self, url: &str, shown_url: &str) -> Result<Backend, GitError> {
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
    pub(super) fn cli<'a>(
        &'a self,
        path: &'a Path,
        url: &'a str,
        shown_url: &'a str,
    ) -> GitCli<'a> {
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
    pub(super) fn fetch_locked(
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

    pub(super) fn checkout_inner(
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
    pub(super) fn fetch_branch(
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
    pub(super) fn fetch_by_id(
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

    pub(super) fn fetch_options(&self, shown_url: &str) -> FetchOptions<'static> {
        let mut fo = FetchOptions::new();
        fo.remote_callbacks(remote_callbacks(&self.creds, shown_url))
            .proxy_options(proxy_options())
            .prune(FetchPrune::Off)
            .update_fetchhead(false)
            .download_tags(AutotagOption::Auto);
        fo
    }
}
