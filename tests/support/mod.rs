//! Shared helpers of the cross-role tests: real git repositories made with git2 in temp dirs,
//! request builders, waiting on builds, reading archives.
//!
//! - `cluster.rs`: the in-process cluster every in-process suite starts ([`cluster::Local`]).
//! - `procs.rs`: real `ish` processes (master, slaves, gateway) for the multi-process suites.
//! - `jobs.rs`: job configs and build bodies, valid and hostile.
//! - `http.rs`: the HTTP client and raw-socket requests to a gateway.
//! - `resp.rs`, `checks.rs`: an HTTP answer and the collected refusal checks; shared with the
//!   gateway's oneshot tests, which include them with `#[path]`.
#![allow(dead_code)]

pub mod checks;
pub mod cluster;
pub mod http;
pub mod jobs;
pub mod procs;
pub mod resp;

/// The HTTP types `resp.rs` and `checks.rs` name as `super::…` (the gateway's tests give them
/// axum's re-export of the same `http` crate).
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

use ish_cli::local::BuildsClient;
use ish_core::proto::{self, project_source::Kind};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

/// A git repository in a temp dir.
pub struct Repo {
    pub dir: tempfile::TempDir,
    pub repo: git2::Repository,
}

impl Repo {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("master");
        let repo = git2::Repository::init_opts(dir.path(), &opts).unwrap();
        Self { dir, repo }
    }

    /// Writes `files` and commits them on the current branch; returns the commit id.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> String {
        for (name, content) in files {
            let path = self.dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        let mut index = self.repo.index().unwrap();
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
            .unwrap();
        index.write().unwrap();
        let tree = self.repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("Ish Test", "test@ish.invalid").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
            .unwrap()
            .to_string()
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }
}

/// Writes `yaml` as the clusterrunner.yaml of `dir`.
pub fn write_job(dir: &Path, yaml: &str) {
    std::fs::write(dir.join("clusterrunner.yaml"), yaml).unwrap();
}

/// A directory project (temp dir) whose clusterrunner.yaml is `yaml`.
pub fn project_with(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_job(dir.path(), yaml);
    dir
}

pub fn git_request(url: &str, branch: &str, hash: &str) -> proto::BuildRequest {
    proto::BuildRequest {
        source: Some(proto::ProjectSource {
            kind: Some(Kind::Git(proto::GitSource {
                url: url.into(),
                remote: String::new(),
                branch: branch.into(),
                hash: hash.into(),
            })),
        }),
        ..Default::default()
    }
}

pub fn dir_request(path: &Path) -> proto::BuildRequest {
    proto::BuildRequest {
        source: Some(proto::ProjectSource {
            kind: Some(Kind::Directory(proto::DirectorySource {
                path: path.display().to_string(),
            })),
        }),
        ..Default::default()
    }
}

pub fn state(b: &proto::Build) -> proto::BuildState {
    proto::BuildState::try_from(b.state).unwrap()
}

pub fn is_final(b: &proto::Build) -> bool {
    matches!(
        state(b),
        proto::BuildState::Finished | proto::BuildState::Error | proto::BuildState::Canceled
    )
}

pub async fn submit(c: &mut BuildsClient, req: proto::BuildRequest) -> u64 {
    c.submit(proto::SubmitBuildRequest { request: Some(req) })
        .await
        .expect("submit")
        .into_inner()
        .build_id
}

/// Submit that returns the status instead of panicking (and gives up after 20 s).
pub async fn submit_raw(
    b: &mut BuildsClient,
    request: Option<proto::BuildRequest>,
) -> Result<u64, tonic::Status> {
    match tokio::time::timeout(
        cluster::STEP,
        b.submit(proto::SubmitBuildRequest { request }),
    )
    .await
    {
        Ok(r) => r.map(|r| r.into_inner().build_id),
        Err(_) => Err(tonic::Status::deadline_exceeded(
            "no answer to Submit in 20 s",
        )),
    }
}

/// Reads a server stream to its end: the number of messages, or the status it failed with
/// (at the call or within the stream; silence for 20 s is DEADLINE_EXCEEDED).
pub async fn drain<T>(
    r: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>,
) -> Result<usize, tonic::Status> {
    let mut s = r?.into_inner();
    let mut n = 0;
    loop {
        match tokio::time::timeout(cluster::STEP, s.message()).await {
            Ok(Ok(Some(_))) => n += 1,
            Ok(Ok(None)) => return Ok(n),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(tonic::Status::deadline_exceeded("stream silent for 20 s"));
            }
        }
    }
}

pub async fn get(c: &mut BuildsClient, id: u64) -> proto::Build {
    c.get(proto::GetBuildRequest { build_id: id })
        .await
        .expect("get")
        .into_inner()
}

/// Polls until `pred` holds for the build (panics after `timeout` with the last state seen).
pub async fn wait_for(
    c: &mut BuildsClient,
    id: u64,
    timeout: Duration,
    pred: impl Fn(&proto::Build) -> bool,
) -> proto::Build {
    let deadline = Instant::now() + timeout;
    loop {
        let b = get(c, id).await;
        if pred(&b) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "build {id} did not reach the expected state in {timeout:?}: {b:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_final(c: &mut BuildsClient, id: u64) -> proto::Build {
    wait_for(c, id, Duration::from_secs(90), is_final).await
}

pub async fn subjobs(c: &mut BuildsClient, id: u64) -> Vec<proto::Subjob> {
    c.list_subjobs(proto::ListSubjobsRequest {
        build_id: id,
        offset: 0,
        limit: 0,
    })
    .await
    .expect("list subjobs")
    .into_inner()
    .subjobs
}

pub async fn download(c: &mut BuildsClient, id: u64, format: proto::ArchiveFormat) -> Vec<u8> {
    let mut s = c
        .download_artifacts(proto::DownloadArtifactsRequest {
            build_id: id,
            format: format as i32,
            offset: 0,
            ..Default::default()
        })
        .await
        .expect("download")
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = s.next().await {
        out.extend_from_slice(&chunk.expect("chunk").data);
    }
    out
}

/// File entries of a zip: name -> content (panics on a duplicate name).
pub fn zip_files(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut out = BTreeMap::new();
    for i in 0..z.len() {
        let mut e = z.by_index(i).unwrap();
        let name = e.name().unwrap().to_string();
        assert!(
            !e.is_dir(),
            "results.zip must only hold files, found {name}"
        );
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        assert!(
            out.insert(name.clone(), data).is_none(),
            "duplicate zip entry {name}"
        );
    }
    out
}

/// Entries of a tar.gz: (directory names, file name -> content).
pub fn tar_entries(bytes: &[u8]) -> (BTreeSet<String>, BTreeMap<String, Vec<u8>>) {
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut dirs = BTreeSet::new();
    let mut files = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        match e.header().entry_type() {
            tar::EntryType::Directory => {
                let name = if name.ends_with('/') {
                    name
                } else {
                    format!("{name}/")
                };
                assert!(dirs.insert(name.clone()), "duplicate tar dir {name}");
            }
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                assert!(
                    files.insert(name.clone(), data).is_none(),
                    "duplicate tar entry {name}"
                );
            }
            other => panic!("unexpected tar entry type {other:?} for {name}"),
        }
    }
    (dirs, files)
}

/// The value an atom's command string exports, e.g. `7` for `export TOKEN="7";`.
pub fn token(command_string: &str) -> String {
    let start = command_string.find('"').unwrap() + 1;
    let end = command_string.rfind('"').unwrap();
    command_string[start..end].to_string()
}

/// What one atom must have produced.
pub struct AtomExpect {
    /// Console output.
    pub console: String,
    /// Exit code.
    pub exit_code: i32,
    /// Files the atom wrote into $ARTIFACT_DIR: relative path -> content.
    pub files: Vec<(String, Vec<u8>)>,
}

impl AtomExpect {
    /// Sets the content of file `t` to `<token>-<slave that recorded the atom>\n`.
    pub fn with_file_from_slave(mut self, token_: &str, subjobs: &[proto::Subjob]) -> Self {
        let atom = subjobs
            .iter()
            .flat_map(|s| &s.atoms)
            .find(|a| token(&a.command_string) == token_)
            .expect("atom of the token");
        self.files = vec![(
            "t".into(),
            format!("{token_}-{}\n", atom.slave).into_bytes(),
        )];
        self
    }
}

/// Checks both archives of a finished build byte for byte against ClusterRunner's layout: for
/// every atom its four clusterrunner_* files and its own artifacts, failures.txt exactly when
/// an atom failed, and nothing else.
pub async fn check_archives(c: &mut BuildsClient, id: u64, expect: impl Fn(&str) -> AtomExpect) {
    let b = get(c, id).await;
    let sjs = subjobs(c, id).await;
    let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut dirs_want: BTreeSet<String> = BTreeSet::from(["./".to_string()]);
    let mut failures = Vec::new();
    let mut n_atoms = 0;
    for sj in &sjs {
        for a in &sj.atoms {
            n_atoms += 1;
            let dir = format!("artifact_{}_{}", sj.id, a.id);
            let e = expect(&token(&a.command_string));
            assert_eq!(a.exit_code, Some(e.exit_code), "exit code of {dir}");
            if e.exit_code != 0 {
                failures.push(dir.clone());
            }
            let t = a.actual_time.expect("actual time");
            want.insert(
                format!("{dir}/clusterrunner_command"),
                format!("{} {}\n", a.command_string, b.command).into_bytes(),
            );
            want.insert(
                format!("{dir}/clusterrunner_exit_code"),
                format!("{}\n", e.exit_code).into_bytes(),
            );
            want.insert(
                format!("{dir}/clusterrunner_time"),
                format!("{t:.2}\n").into_bytes(),
            );
            want.insert(
                format!("{dir}/clusterrunner_console_output"),
                e.console.into_bytes(),
            );
            dirs_want.insert(format!("./{dir}/"));
            for (path, data) in e.files {
                let mut p = PathBuf::from(&dir);
                for part in path.split('/') {
                    p.push(part);
                    if p.to_str().unwrap() != format!("{dir}/{path}") {
                        dirs_want.insert(format!("./{}/", p.display()));
                    }
                }
                want.insert(format!("{dir}/{path}"), data);
            }
        }
    }
    assert_eq!(n_atoms, b.num_atoms as usize);
    if !failures.is_empty() {
        want.insert("failures.txt".into(), failures.join("\n").into_bytes());
    }
    let zip = zip_files(&download(c, id, proto::ArchiveFormat::Zip).await);
    let missing: Vec<&String> = want.keys().filter(|k| !zip.contains_key(*k)).collect();
    let extra: Vec<&String> = zip.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "results.zip entries: missing {missing:?}, unexpected {extra:?}"
    );
    for (k, v) in &want {
        assert_eq!(
            String::from_utf8_lossy(&zip[k]),
            String::from_utf8_lossy(v),
            "content of {k} in results.zip"
        );
    }
    let (tar_dirs, tar_files) = tar_entries(&download(c, id, proto::ArchiveFormat::TarGz).await);
    let want_tar: BTreeMap<String, Vec<u8>> = want
        .iter()
        .map(|(k, v)| (format!("./{k}"), v.clone()))
        .collect();
    assert_eq!(tar_files, want_tar, "results.tar.gz files");
    assert_eq!(tar_dirs, dirs_want, "results.tar.gz directories");
}

/// Lines of a marker file written by setup/teardown commands (one line per run).
pub fn marker_lines(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Dead, or a zombie nobody reaped yet.
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

/// Pids written into files of `dir` by atoms (`echo $$ > $MARKER/pid_$TOKEN`).
pub fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("pid_"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
