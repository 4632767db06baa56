//! Why a build's step failed on this slave, as types instead of strings.
//!
//! Each error's `Display` is the exact message users see in a build's error or console (tests
//! assert on several of them), and [`PrepareError::retryable`] says whether another slave could
//! manage: getting the project is infrastructure (a remote that did not answer, a full disk), a
//! job config or an atomizer that fails is the build's own fault and would fail anywhere.
use crate::git::GitError;

/// Getting a build's project onto this slave's disk failed.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// Fetching or checking out a git project.
    #[error(transparent)]
    Git(#[from] GitError),
    /// Laying out the workspace, or the project is not where the build said (the message).
    #[error("{0}")]
    Workspace(String),
    /// A `remote_files` download (the message names the file and url).
    #[error("{0}")]
    RemoteFile(String),
    /// The blocking fetch task died (panicked or was aborted).
    #[error("fetching the project failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A Prepare failed.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The project could not be fetched here.
    #[error(transparent)]
    Project(#[from] ProjectError),
    /// The job config is missing or invalid (ClusterRunner's message).
    #[error("{0}")]
    JobConfig(String),
    /// The blocking task reading the job config died.
    #[error("loading the job config failed: {0}")]
    JobConfigTask(tokio::task::JoinError),
    /// An atomizer did not produce an atom list.
    #[error(transparent)]
    Atomizer(#[from] AtomizerError),
}

impl PrepareError {
    /// Whether the master may try the build's Prepare on another slave. Only the project fetch
    /// is: a job config or atomizer failure is the build's own and would fail everywhere.
    pub fn retryable(&self) -> bool {
        matches!(self, PrepareError::Project(_))
    }
}

/// An atomizer command failed.
#[derive(Debug, thiserror::Error)]
pub enum AtomizerError {
    /// bash could not be started.
    #[error("Atomizer command failed! Could not start it: {0}")]
    Start(std::io::Error),
    /// The build was canceled while it ran.
    #[error("Atomizer canceled.")]
    Canceled,
    /// Its output (the atom list, which must not be cut) is over the limit.
    #[error(
        "Atomizer command failed! Its output ({total} bytes) is larger than the limit of {limit} bytes."
    )]
    TooMuchOutput {
        /// Bytes it printed.
        total: usize,
        /// The slave's `max_atomizer_output`.
        limit: usize,
    },
    /// It exited non-zero.
    #[error("Atomizer command failed! `{command}` exited with code {code}. Output:\n{tail}")]
    Exited {
        /// The atomizer's command.
        command: String,
        /// Its exit code.
        code: i32,
        /// The end of its output, trimmed.
        tail: String,
    },
}

/// A build's `setup_build` or `teardown_build` command failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// bash could not be started.
    #[error("{hook} could not start: {source}")]
    Start {
        /// `setup_build` or `teardown_build`.
        hook: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// It exited non-zero.
    #[error("{hook} exited with code {code}. Output:\n{tail}")]
    Exited {
        /// `setup_build` or `teardown_build`.
        hook: &'static str,
        /// Its exit code.
        code: i32,
        /// The end of its output.
        tail: String,
    },
}

/// A Setup failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The project could not be fetched here.
    #[error(transparent)]
    Project(#[from] ProjectError),
    /// `setup_build` failed.
    #[error(transparent)]
    Hook(#[from] HookError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_getting_the_project_is_retryable() {
        let fetch = PrepareError::from(ProjectError::RemoteFile("Could not download".into()));
        assert!(fetch.retryable());
        let config = PrepareError::JobConfig("Could not find project yaml file x".into());
        assert!(!config.retryable());
        assert!(!PrepareError::from(AtomizerError::Canceled).retryable());
    }

    #[test]
    fn messages_are_the_ones_users_see() {
        let e = PrepareError::from(AtomizerError::Exited {
            command: "echo x; exit 3".into(),
            code: 3,
            tail: "x".into(),
        });
        assert_eq!(
            e.to_string(),
            "Atomizer command failed! `echo x; exit 3` exited with code 3. Output:\nx"
        );
        let e = AtomizerError::TooMuchOutput {
            total: 20,
            limit: 10,
        };
        assert_eq!(
            e.to_string(),
            "Atomizer command failed! Its output (20 bytes) is larger than the limit of 10 bytes."
        );
        assert_eq!(AtomizerError::Canceled.to_string(), "Atomizer canceled.");
        let e = SetupError::from(HookError::Exited {
            hook: "setup_build",
            code: 2,
            tail: "boom".into(),
        });
        assert_eq!(
            e.to_string(),
            "setup_build exited with code 2. Output:\nboom"
        );
        let e = HookError::Start {
            hook: "teardown_build",
            source: std::io::Error::other("no bash"),
        };
        assert_eq!(e.to_string(), "teardown_build could not start: no bash");
        let e = PrepareError::from(ProjectError::Workspace(
            "The build request has no project source.".into(),
        ));
        assert_eq!(e.to_string(), "The build request has no project source.");
    }
}
