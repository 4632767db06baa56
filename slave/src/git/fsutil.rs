use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};

use git2::{ErrorCode, Repository, RepositoryInitOptions};

use super::types::*;

/// Serializes access to one cache repository within this process.
pub(super) fn path_lock(path: &Path) -> Arc<Mutex<()>> {
    static LOCKS: LazyLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut locks = lock_ignoring_poison(&LOCKS);
    Arc::clone(locks.entry(path.to_owned()).or_default())
}

/// A panic in another fetch leaves nothing half-done that the next git operation cannot cope
/// with, so a poisoned lock is still usable.
pub(super) fn lock_ignoring_poison<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the bare cache at `path`, creating it (atomically, via a temporary sibling) if missing
/// and replacing it if it is not a usable repository; also tells whether it was created.
pub(super) fn open_or_init_cache(root: &Path, path: &Path) -> Result<(Repository, bool), GitError> {
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
pub(super) fn ensure_remote(
    repo: &Repository,
    path: &Path,
    name: &str,
    url: &str,
) -> Result<(), GitError> {
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

pub(super) fn create_private_dir(dir: &Path) -> Result<(), GitError> {
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
pub(super) fn check_dest(dest: &Path) -> Result<bool, GitError> {
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
pub(super) fn cleanup_dest(dest: &Path, existed: bool) {
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

pub(super) fn path_str(path: &Path) -> Result<&str, GitError> {
    path.to_str().ok_or_else(|| GitError::Cache {
        path: path.to_owned(),
        message: "the path is not valid UTF-8".to_owned(),
    })
}

pub(super) fn cache_error(path: &Path, e: &git2::Error) -> GitError {
    GitError::Cache {
        path: path.to_owned(),
        message: describe(e),
    }
}

/// A git2 error as a sentence (its `Display` appends class and code numbers).
pub(super) fn describe(e: &git2::Error) -> String {
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
