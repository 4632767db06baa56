//! ClusterRunner's JSON objects (spec §4.3) made from the master's protobuf messages.
//!
//! Typed structs rather than `serde_json::Value` so fields keep ClusterRunner's order on the wire
//! (`state_timestamps` is ordered by time; a `Value` map would sort its keys).
use ish_core::proto;
use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;

/// A build (spec §4.3).
#[derive(Debug, Serialize)]
pub struct BuildJson {
    /// Build id.
    pub id: u64,
    /// QUEUED (also for PREPARING/PREPARED), BUILDING, FINISHED, ERROR or CANCELED.
    pub status: &'static str,
    /// "<finished> of <total> subjobs are complete (<pct>%)." once there are subjobs.
    pub details: Option<String>,
    /// Why the build is in ERROR.
    pub error_message: Option<String>,
    /// Number of atoms, once BUILDING or FINISHED.
    pub num_atoms: Option<u32>,
    /// Number of subjobs (0 until prepared).
    pub num_subjobs: u32,
    /// Null until FINISHED (then the failed atoms), `[]` when CANCELED.
    pub failed_atoms: Option<Vec<AtomJson>>,
    /// NO_FAILURES / FAILURE once FINISHED, FAILURE when CANCELED, else null.
    pub result: Option<&'static str>,
    /// The request as the client sent it, plus `build_project_directory`.
    pub request_params: Value,
    /// When the build entered each state.
    pub state_timestamps: StateTimestamps,
    /// URL of `artifacts.zip` once it exists.
    pub artifacts: Option<String>,
    /// Ish CD extension: atoms that failed, then passed on a retry (job `retries`). Only
    /// present when there are some, so ClusterRunner's shape is unchanged otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flaky_atoms: Vec<AtomJson>,
}

/// `state_timestamps`: every state, ordered by time with the states never entered (null) last.
#[derive(Debug, Clone, PartialEq)]
pub struct StateTimestamps(pub Vec<(&'static str, Option<f64>)>);

impl Serialize for StateTimestamps {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// An atom (spec §4.3).
#[derive(Debug, Serialize)]
pub struct AtomJson {
    /// Index within its subjob.
    pub id: u32,
    /// Its subjob.
    pub subjob_id: u32,
    /// The export prefix, e.g. `export TOKEN="a";`.
    pub command_string: String,
    /// Seconds expected from timing history.
    pub expected_time: Option<f64>,
    /// Seconds it took.
    pub actual_time: Option<f64>,
    /// Exit code once completed.
    pub exit_code: Option<i32>,
    /// NOT_STARTED, IN_PROGRESS or COMPLETED.
    pub state: &'static str,
    /// Ish CD extension: runs made (only present when more than one: job `retries`).
    #[serde(skip_serializing_if = "tries_is_default")]
    pub tries: u32,
    /// Ish CD extension: failed, then passed on a retry (only present when true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub flaky: bool,
    /// Ish CD extension: killed for exceeding the job's atom_timeout (only present when true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
}

fn tries_is_default(t: &u32) -> bool {
    *t <= 1
}

/// A subjob (spec §4.3).
#[derive(Debug, Serialize)]
pub struct SubjobJson {
    /// Index within the build.
    pub id: u32,
    /// The job's commands.
    pub command: String,
    /// Its atoms.
    pub atoms: Vec<AtomJson>,
    /// The slave it was dispatched to (its name), or null.
    pub slave: Option<String>,
}

/// A slave as the master sees it (spec §4.3).
#[derive(Debug, Serialize)]
pub struct SlaveJson {
    /// The slave's name (ClusterRunner's host:port).
    pub url: String,
    /// Slave id.
    pub id: u64,
    /// The slave process's session id.
    pub session_id: Option<String>,
    /// Executors it has.
    pub num_executors: u32,
    /// Executors running work now.
    pub num_executors_in_use: u32,
    /// A build it is set up for, or null.
    pub current_build_id: Option<u64>,
    /// Always true: the master lists connected slaves only.
    pub is_alive: bool,
    /// True while it drains.
    pub is_in_shutdown_mode: bool,
}

/// An eventlog entry: `__id__`, `__tag__`, `__timestamp__` and the tag's fields.
#[derive(Debug, Serialize)]
pub struct EventJson {
    /// 1, 2, 3... per master process.
    #[serde(rename = "__id__")]
    pub id: u64,
    /// What happened.
    #[serde(rename = "__tag__")]
    pub tag: String,
    /// When (epoch seconds).
    #[serde(rename = "__timestamp__")]
    pub timestamp: f64,
    /// Tag-specific fields.
    #[serde(flatten)]
    pub fields: serde_json::Map<String, Value>,
}

fn state_of(b: &proto::Build) -> proto::BuildState {
    proto::BuildState::try_from(b.state).unwrap_or_default()
}

/// ClusterRunner's `status` for an internal state.
pub fn status_name(s: proto::BuildState) -> &'static str {
    use proto::BuildState as S;
    match s {
        S::Unspecified | S::Queued | S::Preparing | S::Prepared => "QUEUED",
        S::Building => "BUILDING",
        S::Finished => "FINISHED",
        S::Error => "ERROR",
        S::Canceled => "CANCELED",
    }
}

fn state_key(s: proto::BuildState) -> Option<&'static str> {
    ish_core::state::BuildState::try_from(s)
        .ok()
        .map(|s| s.name_lower())
}

/// The build object. `artifacts_base` is `<scheme>://<host>` of the request, used for the
/// `artifacts` URL.
pub fn build(b: &proto::Build, artifacts_base: &str) -> BuildJson {
    use proto::BuildState as S;
    let state = state_of(b);
    let details = (b.num_subjobs > 0).then(|| {
        let pct = f64::from(b.completed_subjobs) * 100.0 / f64::from(b.num_subjobs);
        format!(
            "{} of {} subjobs are complete ({pct:.1}%).",
            b.completed_subjobs, b.num_subjobs
        )
    });
    let failed_atoms = match state {
        S::Finished => Some(b.failed_atoms.iter().map(atom).collect()),
        S::Canceled => Some(Vec::new()),
        _ => None,
    };
    let result = match state {
        S::Canceled => Some("FAILURE"),
        S::Finished => Some(
            if proto::BuildResult::try_from(b.result) == Ok(proto::BuildResult::NoFailures) {
                "NO_FAILURES"
            } else {
                "FAILURE"
            },
        ),
        _ => None,
    };
    let mut request_params = b
        .request
        .as_ref()
        .and_then(|r| serde_json::from_str::<Value>(&r.request_params_json).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| Value::Object(Default::default()));
    // Present from creation, as ClusterRunner sends it: the directory the build runs in once it
    // is prepared; before that a directory build's own directory, and "" for a git build (its
    // checkout is made on the slaves).
    let project_dir = if b.project_dir.is_empty() {
        match b
            .request
            .as_ref()
            .and_then(|r| r.source.as_ref()?.kind.as_ref())
        {
            Some(proto::project_source::Kind::Directory(d)) => d.path.clone(),
            _ => String::new(),
        }
    } else {
        b.project_dir.clone()
    };
    if let Some(m) = request_params.as_object_mut() {
        m.insert("build_project_directory".into(), project_dir.into());
    }
    BuildJson {
        id: b.id,
        status: status_name(state),
        details,
        error_message: (!b.error_message.is_empty()).then(|| b.error_message.clone()),
        num_atoms: matches!(state, S::Building | S::Finished).then_some(b.num_atoms),
        num_subjobs: b.num_subjobs,
        failed_atoms,
        result,
        request_params,
        state_timestamps: state_timestamps(b),
        artifacts: b
            .artifacts_ready
            .then(|| format!("{artifacts_base}/v1/build/{}/artifacts.zip", b.id)),
        flaky_atoms: b.flaky_atoms.iter().map(atom).collect(),
    }
}

fn state_timestamps(b: &proto::Build) -> StateTimestamps {
    let mut v: Vec<(&'static str, Option<f64>)> = ish_core::state::BuildState::ALL
        .iter()
        .map(|s| (s.name_lower(), None))
        .collect();
    for ts in &b.state_timestamps {
        let key = proto::BuildState::try_from(ts.state)
            .ok()
            .and_then(state_key);
        // A state entered twice (a preparation retried) shows when it was last entered.
        if let Some(slot) = v.iter_mut().find(|(k, _)| Some(*k) == key) {
            slot.1 = Some(ts.at);
        }
    }
    // Stable sort: states never entered keep lifecycle order at the end.
    v.sort_by(|a, b| match (a.1, b.1) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    StateTimestamps(v)
}

/// The atom object.
pub fn atom(a: &proto::Atom) -> AtomJson {
    use proto::AtomState as S;
    AtomJson {
        id: a.id,
        subjob_id: a.subjob_id,
        command_string: a.command_string.clone(),
        expected_time: a.expected_time,
        actual_time: a.actual_time,
        exit_code: a.exit_code,
        state: match proto::AtomState::try_from(a.state).unwrap_or_default() {
            S::Unspecified | S::NotStarted => "NOT_STARTED",
            S::InProgress => "IN_PROGRESS",
            S::Completed => "COMPLETED",
        },
        tries: a.tries,
        flaky: a.flaky,
        timed_out: a.timed_out,
    }
}

/// The subjob object.
pub fn subjob(s: &proto::Subjob) -> SubjobJson {
    SubjobJson {
        id: s.id,
        command: s.command.clone(),
        atoms: s.atoms.iter().map(atom).collect(),
        slave: (!s.slave.is_empty()).then(|| s.slave.clone()),
    }
}

/// The slave object.
pub fn slave(s: &proto::Slave) -> SlaveJson {
    SlaveJson {
        url: s.name.clone(),
        id: s.id,
        session_id: (!s.session_id.is_empty()).then(|| s.session_id.clone()),
        num_executors: s.executors,
        num_executors_in_use: s.executors_in_use,
        current_build_id: s.build_ids.first().copied(),
        is_alive: true,
        is_in_shutdown_mode: proto::SlaveState::try_from(s.state)
            == Ok(proto::SlaveState::Draining),
    }
}

/// The eventlog entry.
pub fn event(e: &proto::Event) -> EventJson {
    let fields = match serde_json::from_str::<Value>(&e.fields_json) {
        Ok(Value::Object(m)) => m,
        _ => Default::default(),
    };
    EventJson {
        id: e.id,
        tag: e.tag.clone(),
        timestamp: e.timestamp,
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::BuildState as S;
    use serde_json::json;

    fn ts(state: S, at: f64) -> proto::StateTimestamp {
        proto::StateTimestamp {
            state: state as i32,
            at,
        }
    }

    fn sample(state: S) -> proto::Build {
        proto::Build {
            id: 7,
            state: state as i32,
            request: Some(proto::BuildRequest {
                request_params_json: r#"{"type": "directory", "project_directory": "/p"}"#.into(),
                ..Default::default()
            }),
            num_subjobs: 3,
            completed_subjobs: 2,
            num_atoms: 5,
            project_dir: "/p".into(),
            state_timestamps: vec![
                ts(S::Queued, 100.0),
                ts(S::Preparing, 101.5),
                ts(S::Prepared, 101.0),
                ts(S::Building, 102.0),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn building_build() {
        let j = serde_json::to_value(build(&sample(S::Building), "http://h:1")).unwrap();
        assert_eq!(
            j,
            json!({
                "id": 7, "status": "BUILDING",
                "details": "2 of 3 subjobs are complete (66.7%).",
                "error_message": null, "num_atoms": 5, "num_subjobs": 3,
                "failed_atoms": null, "result": null,
                "request_params": {"type": "directory", "project_directory": "/p",
                                   "build_project_directory": "/p"},
                "state_timestamps": {"queued": 100.0, "preparing": 101.5, "prepared": 101.0,
                                     "building": 102.0, "finished": null, "error": null,
                                     "canceled": null},
                "artifacts": null,
            })
        );
    }

    #[test]
    fn state_timestamps_are_ordered_by_time_nulls_last() {
        let s = serde_json::to_string(&build(&sample(S::Building), "").state_timestamps).unwrap();
        assert_eq!(
            s,
            r#"{"queued":100.0,"prepared":101.0,"preparing":101.5,"building":102.0,"finished":null,"error":null,"canceled":null}"#
        );
    }

    #[test]
    fn queued_build_has_no_counts() {
        let mut b = sample(S::Preparing);
        b.num_subjobs = 0;
        b.completed_subjobs = 0;
        b.project_dir.clear();
        let j = serde_json::to_value(build(&b, "")).unwrap();
        assert_eq!(j["status"], "QUEUED");
        assert_eq!(j["details"], Value::Null);
        assert_eq!(j["num_atoms"], Value::Null);
        assert_eq!(j["num_subjobs"], 0);
        // Every key from creation, as ClusterRunner: a git build's checkout is not known yet.
        assert_eq!(
            j["request_params"],
            json!({"type": "directory", "project_directory": "/p", "build_project_directory": ""})
        );
        b.request.as_mut().unwrap().source = Some(proto::ProjectSource {
            kind: Some(proto::project_source::Kind::Directory(
                proto::DirectorySource { path: "/d".into() },
            )),
        });
        let j = serde_json::to_value(build(&b, "")).unwrap();
        assert_eq!(j["request_params"]["build_project_directory"], "/d");
    }

    #[test]
    fn finished_canceled_and_error_builds() {
        let mut b = sample(S::Finished);
        b.completed_subjobs = 3;
        b.result = proto::BuildResult::Failure as i32;
        b.artifacts_ready = true;
        b.failed_atoms = vec![proto::Atom {
            id: 1,
            subjob_id: 2,
            command_string: "export X=\"1\";".into(),
            exit_code: Some(3),
            actual_time: Some(0.25),
            state: proto::AtomState::Completed as i32,
            ..Default::default()
        }];
        let j = serde_json::to_value(build(&b, "http://gw:43000")).unwrap();
        assert_eq!(j["details"], "3 of 3 subjobs are complete (100.0%).");
        assert_eq!(j["result"], "FAILURE");
        assert_eq!(j["artifacts"], "http://gw:43000/v1/build/7/artifacts.zip");
        assert_eq!(
            j["failed_atoms"],
            json!([{"id": 1, "subjob_id": 2, "command_string": "export X=\"1\";",
                    "expected_time": null, "actual_time": 0.25, "exit_code": 3,
                    "state": "COMPLETED"}])
        );
        b.result = proto::BuildResult::NoFailures as i32;
        b.failed_atoms.clear();
        let j = serde_json::to_value(build(&b, "")).unwrap();
        assert_eq!(
            (j["result"].clone(), j["failed_atoms"].clone()),
            (json!("NO_FAILURES"), json!([]))
        );

        let j = serde_json::to_value(build(&sample(S::Canceled), "")).unwrap();
        assert_eq!(j["result"], "FAILURE");
        assert_eq!(j["failed_atoms"], json!([]));
        assert_eq!(j["num_atoms"], Value::Null);

        let mut b = sample(S::Error);
        b.error_message = "Atomizer command failed!".into();
        let j = serde_json::to_value(build(&b, "")).unwrap();
        assert_eq!(j["status"], "ERROR");
        assert_eq!(j["result"], Value::Null);
        assert_eq!(j["error_message"], "Atomizer command failed!");
    }

    #[test]
    fn subjob_slave_and_event_objects() {
        let s = proto::Subjob {
            id: 1,
            command: "echo $X".into(),
            atoms: vec![proto::Atom {
                id: 0,
                subjob_id: 1,
                command_string: "export X=\"a\";".into(),
                state: proto::AtomState::InProgress as i32,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(subjob(&s)).unwrap(),
            json!({"id": 1, "command": "echo $X", "slave": null, "atoms": [
                {"id": 0, "subjob_id": 1, "command_string": "export X=\"a\";",
                 "expected_time": null, "actual_time": null, "exit_code": null,
                 "state": "IN_PROGRESS"}]})
        );
        let sl = proto::Slave {
            id: 2,
            name: "local-0".into(),
            executors: 4,
            executors_in_use: 1,
            state: proto::SlaveState::Draining as i32,
            build_ids: vec![9, 10],
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(slave(&sl)).unwrap(),
            json!({"url": "local-0", "id": 2, "session_id": null, "num_executors": 4,
                   "num_executors_in_use": 1, "current_build_id": 9, "is_alive": true,
                   "is_in_shutdown_mode": true})
        );
        let e = proto::Event {
            id: 3,
            tag: "BUILD_REQUEST_QUEUED".into(),
            timestamp: 5.5,
            fields_json: r#"{"build_id": 1}"#.into(),
        };
        assert_eq!(
            serde_json::to_value(event(&e)).unwrap(),
            json!({"__id__": 3, "__tag__": "BUILD_REQUEST_QUEUED", "__timestamp__": 5.5,
                   "build_id": 1})
        );
    }

    #[test]
    fn flaky_and_timed_out_atoms_are_extensions_shown_only_when_set() {
        let mut b = sample(S::Finished);
        let plain = serde_json::to_value(build(&b, "")).unwrap();
        assert!(plain.get("flaky_atoms").is_none());
        b.flaky_atoms = vec![proto::Atom {
            id: 1,
            command_string: "export T=\"x\";".into(),
            exit_code: Some(0),
            tries: 2,
            flaky: true,
            state: proto::AtomState::Completed as i32,
            ..Default::default()
        }];
        let j = serde_json::to_value(build(&b, "")).unwrap();
        assert_eq!(j["flaky_atoms"][0]["tries"], 2);
        assert_eq!(j["flaky_atoms"][0]["flaky"], true);
        assert!(j["flaky_atoms"][0].get("timed_out").is_none());
    }
}
