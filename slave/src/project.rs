//! Build workspaces on a slave: getting a build's project onto disk and reading its job config.
//!
//! Layout under `<data_dir>`:
//! - `repos/` — the git cache, one bare repository per remote (see `git.rs`); a second build of
//!   the same repository only fetches;
//! - `builds/<build_id>.<seq>/src/` — a fresh working copy of the build's commit (git projects);
//! - `builds/<build_id>.<seq>/artifacts/` — `$ARTIFACT_DIR`s of running atoms.
//!
//! Everything here blocks (git, file system); callers use `spawn_blocking`.
use crate::error::ProjectError;
use crate::git::{FetchRequest, GitCredentials, RepoCache};
use ish_core::jobconfig;
use ish_core::proto::{self, project_source::Kind};
use std::path::{Path, PathBuf};

/// Name of the job file in a project.
pub const JOB_FILE: &str = "clusterrunner.yaml";

/// Where the slave keeps repositories and workspaces.
#[derive(Debug, Clone)]
pub struct Workspaces {
    root: PathBuf,
    repos: RepoCache,
}

/// A build's project on this slave.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// `builds/<id>`: everything of the build that the slave created (deleted at teardown).
    pub build_dir: PathBuf,
    /// `$PROJECT_DIR`.
    pub project_dir: PathBuf,
    /// Commit checked out (git only).
    pub commit: String,
}

impl Workspaces {
    /// Workspaces under `data_dir`.
    pub fn new(data_dir: &Path, creds: GitCredentials) -> Self {
        Self {
            root: data_dir.join("builds"),
            repos: RepoCache::new(data_dir.join("repos"), creds),
        }
    }

    /// `builds/<id>.<seq>`: `seq` tells apart successive workspaces of one build on this slave
    /// (torn down, then prepared again after a master restart), so one's teardown never deletes
    /// the next one.
    pub fn build_dir(&self, id: u64, seq: u64) -> PathBuf {
        self.root.join(format!("{id}.{seq}"))
    }

    /// Puts build `id`'s project on disk (or finds it there from an earlier Prepare) and returns
    /// where it is. Errors are messages for the user.
    pub fn materialize(
        &self,
        id: u64,
        seq: u64,
        spec: &proto::ProjectSpec,
    ) -> Result<Workspace, ProjectError> {
        let build_dir = self.build_dir(id, seq);
        std::fs::create_dir_all(&build_dir).map_err(|e| {
            ProjectError::Workspace(format!("Could not create {}: {e}", build_dir.display()))
        })?;
        let sub = spec.project_directory.trim_matches('/');
        // Path::join("") would add a trailing slash to $PROJECT_DIR.
        let under = |base: &Path| {
            if sub.is_empty() {
                base.to_path_buf()
            } else {
                base.join(sub)
            }
        };
        match spec.source.as_ref().and_then(|s| s.kind.as_ref()) {
            None => Err(ProjectError::Workspace(
                "The build request has no project source.".into(),
            )),
            Some(Kind::Directory(d)) => {
                let dir = under(Path::new(&d.path));
                if !dir.is_dir() {
                    return Err(ProjectError::Workspace(format!(
                        "Could not find the directory \"{}\" on {}. Note that if you are running Ish CD on multiple hosts, \"directory\" type builds need that directory on every slave.",
                        dir.display(),
                        hostname()
                    )));
                }
                Ok(Workspace {
                    build_dir,
                    project_dir: dir,
                    commit: String::new(),
                })
            }
            Some(Kind::Git(g)) => {
                let src = build_dir.join("src");
                let marker = build_dir.join(".commit");
                let commit = if !spec.commit.is_empty()
                    && std::fs::read_to_string(&marker).is_ok_and(|c| c.trim() == spec.commit)
                {
                    // Prepared here already: the working copy is this commit.
                    spec.commit.clone()
                } else {
                    let hash = if spec.commit.is_empty() {
                        g.hash.as_str()
                    } else {
                        spec.commit.as_str()
                    };
                    let commit = self.repos.fetch(&FetchRequest {
                        url: &g.url,
                        remote: &g.remote,
                        branch: &g.branch,
                        hash,
                    })?;
                    if src.exists() {
                        std::fs::remove_dir_all(&src).map_err(|e| {
                            ProjectError::Workspace(format!(
                                "Could not clean {}: {e}",
                                src.display()
                            ))
                        })?;
                    }
                    self.repos.checkout(&g.url, &commit, &src)?;
                    std::fs::write(&marker, &commit).map_err(|e| {
                        ProjectError::Workspace(format!(
                            "Could not write {}: {e}",
                            marker.display()
                        ))
                    })?;
                    commit
                };
                let project_dir = under(&src);
                if !project_dir.is_dir() {
                    return Err(ProjectError::Workspace(format!(
                        "The project_directory \"{sub}\" does not exist in {} at commit {commit}.",
                        g.url
                    )));
                }
                Ok(Workspace {
                    build_dir,
                    project_dir,
                    commit,
                })
            }
        }
    }

    /// Deletes everything the slave created for build `id` (never a directory project itself).
    pub fn remove(&self, id: u64, seq: u64) {
        let dir = self.build_dir(id, seq);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(build = id, error = %e, "could not delete workspace");
        }
    }

    /// Deletes every leftover workspace (from a previous run of this slave).
    pub fn clear(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Loads the job config: the inline `config_json` when given, else `clusterrunner.yaml` in the
/// project directory. Errors are ClusterRunner's messages.
pub fn load_job(
    project_dir: &Path,
    job_name: &str,
    config_json: &str,
) -> Result<proto::JobConfig, String> {
    let job = (!job_name.is_empty()).then_some(job_name);
    if !config_json.is_empty() {
        return jobconfig::parse_inline_config_str(config_json, job).map_err(|e| e.to_string());
    }
    let path = project_dir.join(JOB_FILE);
    let meta = std::fs::metadata(&path)
        .map_err(|_| format!("Could not find project yaml file {}", path.display()))?;
    if meta.len() > jobconfig::MAX_CONFIG_BYTES as u64 {
        return Err(format!(
            "{} is {} bytes; the limit is {} bytes.",
            path.display(),
            meta.len(),
            jobconfig::MAX_CONFIG_BYTES
        ));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("Could not read {}: {e}", path.display()))?;
    jobconfig::parse_project_yaml(&text, job).map_err(|e| e.to_string())
}

/// This host's name (for messages).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "this slave".into())
}
