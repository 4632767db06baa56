//! What `ish build` needs of a cluster, whatever carries it: the seam between the one build
//! flow (`flow.rs`) and its transports (`grpc.rs`, `rest.rs`).
use ish_core::proto;

/// A build's state as the client shows it, from either transport.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BuildView {
    /// Build id.
    pub id: u64,
    /// Its state.
    pub state: proto::BuildState,
    /// Finished with no failures (only meaningful once FINISHED).
    pub passed: bool,
    /// Progress as the transport tells it (counts of subjobs and atoms).
    pub detail: String,
    /// Atoms in the build, when known.
    pub num_atoms: Option<u64>,
    /// Failed atoms of a finished build.
    pub failed: Vec<FailedAtom>,
    /// Why an ERROR build ended.
    pub error: String,
}

/// One failed atom, for the final report.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FailedAtom {
    /// Subjob id.
    pub subjob: u64,
    /// Atom id.
    pub atom: u64,
    /// Exit code as shown.
    pub exit: String,
    /// The atom's command string.
    pub command: String,
}

impl BuildView {
    /// True once the build will not change any more.
    pub fn is_final(&self) -> bool {
        matches!(
            self.state,
            proto::BuildState::Finished | proto::BuildState::Error | proto::BuildState::Canceled
        )
    }

    /// The one progress line: `build 7: BUILDING  2/3 subjobs ...`.
    pub fn progress_line(&self) -> String {
        let state = self.state.as_str_name().trim_start_matches("BUILD_STATE_");
        let mut s = format!("build {}: {state}", self.id);
        if !self.detail.is_empty() {
            s += "  ";
            s += &self.detail;
        }
        s
    }
}

/// A cluster as `ish build` uses it.
pub(crate) trait BuildApi {
    /// Where builds go, for messages ("Submitted build 3 to ...").
    fn target(&self) -> &str;
    /// Submits the build; answers its id.
    async fn submit(&mut self, req: &proto::BuildRequest) -> anyhow::Result<u64>;
    /// Waits for the build's next state (the first call answers the current one).
    async fn next_state(&mut self, id: u64) -> anyhow::Result<BuildView>;
    /// Cancels the build.
    async fn cancel(&mut self, id: u64) -> anyhow::Result<()>;
    /// The build's results.zip.
    async fn results_zip(&mut self, id: u64) -> anyhow::Result<Vec<u8>>;
}
