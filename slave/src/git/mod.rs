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

mod cache;
mod cli;
mod creds;
mod fsutil;
mod refs;
#[cfg(test)]
mod tests;
mod types;

pub use cache::RepoCache;
pub use types::{FetchRequest, GitCredentials, GitError, GitTransport};

// The tests reach into every room's private helpers.
#[cfg(test)]
use {cli::*, creds::*, refs::*, types::*};
