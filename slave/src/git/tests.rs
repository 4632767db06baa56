use super::*;
use git2::{CredentialType, ErrorCode, Oid, Repository};
use git2::{Signature, Status};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
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
        let mut child = std::process::Command::new(Path::new(exec_path.trim()).join("git-daemon"))
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
        msg.starts_with(&format!("failed to fetch {missing_repo}: ")) && msg.contains("missing"),
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
