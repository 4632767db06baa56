//! ClusterRunner build requests (spec §7.1) and build updates (cancel) turned into gRPC requests.
//!
//! Every refusal is a ClusterRunner status response (`{"status": "FAILURE", "error": ...}`) and
//! happens before anything reaches the master, so nothing is stored. Unlike ClusterRunner
//! (500 and a zombie build), unknown parameters are refused by name.
use crate::error::ApiError;
use ish_core::proto::{self, project_source::Kind};
use serde_json::{Map, Value};

/// Parameters of a git build.
const GIT_PARAMS: &[&str] = &[
    "type",
    "url",
    "remote",
    "branch",
    "hash",
    "project_directory",
    "job_name",
    "config",
    "atoms_override",
    "remote_files",
];

/// Parameters of a directory build.
const DIRECTORY_PARAMS: &[&str] = &[
    "type",
    "project_directory",
    "job_name",
    "config",
    "atoms_override",
    "remote_files",
];

fn fail(msg: impl Into<String>) -> ApiError {
    ApiError::Failure(Some(msg.into()))
}

/// Python's `repr` of a list of strings, as ClusterRunner's messages print them.
fn py_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A string parameter; JSON null counts as absent.
fn string(m: &Map<String, Value>, key: &str) -> Result<String, ApiError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(fail(format!("Parameter \"{key}\" must be a string."))),
    }
}

/// Translates a decoded `POST /v1/build` body into the master's request.
pub fn build_request(body: &Value) -> Result<proto::BuildRequest, ApiError> {
    let m = body
        .as_object()
        .ok_or_else(|| fail("The build request must be a JSON object."))?;
    let kind = match m.get("type") {
        Some(Value::String(t)) => t.to_ascii_lowercase(),
        _ => String::new(),
    };
    let (allowed, required) = match kind.as_str() {
        "git" => (GIT_PARAMS, "url"),
        "directory" => (DIRECTORY_PARAMS, "project_directory"),
        _ => return Err(fail("Invalid build request type.")),
    };
    if string(m, required)?.trim().is_empty() {
        return Err(fail(format!(
            "Missing required parameter. Required parameters: {}",
            py_list(&[required])
        )));
    }
    let unknown: Vec<&str> = m
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(fail(format!(
            "Unknown parameter(s) for a {kind} build: {}. Allowed parameters: {}",
            py_list(&unknown),
            py_list(allowed)
        )));
    }
    let source = if kind == "git" {
        Kind::Git(proto::GitSource {
            url: string(m, "url")?,
            remote: string(m, "remote")?,
            branch: string(m, "branch")?,
            hash: string(m, "hash")?,
        })
    } else {
        Kind::Directory(proto::DirectorySource {
            path: string(m, "project_directory")?,
        })
    };
    let config_json = match m.get("config") {
        None | Some(Value::Null) => String::new(),
        Some(v @ Value::Object(_)) => v.to_string(),
        Some(_) => {
            return Err(fail(
                "Parameter \"config\" must be a JSON object (the sections of one job).",
            ));
        }
    };
    let atoms_override = match m.get("atoms_override") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| fail("Parameter \"atoms_override\" must be a list of strings."))?,
        Some(_) => {
            return Err(fail(
                "Parameter \"atoms_override\" must be a list of strings.",
            ));
        }
    };
    let remote_files = match m.get("remote_files") {
        None | Some(Value::Null) => Default::default(),
        Some(Value::Object(files)) => files
            .iter()
            .map(|(k, v)| v.as_str().map(|u| (k.clone(), u.to_string())))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                fail("Parameter \"remote_files\" must map file names to URL strings.")
            })?,
        Some(_) => {
            return Err(fail(
                "Parameter \"remote_files\" must map file names to URL strings.",
            ));
        }
    };
    Ok(proto::BuildRequest {
        source: Some(proto::ProjectSource { kind: Some(source) }),
        // For directory builds the directory itself is the project; the subdirectory field is
        // git's.
        project_directory: if kind == "git" {
            string(m, "project_directory")?
        } else {
            String::new()
        },
        job_name: string(m, "job_name")?,
        config_json,
        atoms_override,
        remote_files,
        env: Default::default(),
        origin: proto::BuildOrigin::Clusterrunner as i32,
        request_params_json: body.to_string(),
    })
}

/// Python's `str()` of a JSON value, for ClusterRunner's validation messages.
fn py_str(v: &Value) -> String {
    fn repr(v: &Value) -> String {
        match v {
            Value::String(s) => format!("'{s}'"),
            other => py_str(other),
        }
    }
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) => format!("[{}]", a.iter().map(repr).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!("'{k}': {}", repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Checks a `PUT /v1/build/<id>` body: only `{"status": "canceled"}` is allowed. ClusterRunner's
/// messages; `{}` is a failure without a message.
pub fn validate_cancel(body: &Value) -> Result<(), ApiError> {
    let m = body
        .as_object()
        .ok_or_else(|| fail("The build update must be a JSON object."))?;
    // ClusterRunner reports the last offending key.
    let mut message = None;
    for (k, v) in m {
        if k != "status" {
            message = Some(format!("Key ({k}) is not in list of allowed keys (status)"));
        } else if v != "canceled" {
            message = Some(format!(
                "Value ({}) is not in list of allowed values (['canceled']) for status",
                py_str(v)
            ));
        }
    }
    match message {
        Some(msg) => Err(fail(msg)),
        None if m.is_empty() => Err(ApiError::Failure(None)),
        None => Ok(()),
    }
}

/// Slaves named by a `POST /v1/slave/shutdown` body: `Ok(None)` means all of them.
pub fn shutdown_targets(body: &Value) -> Result<Option<Vec<u64>>, ApiError> {
    if body
        .get("shutdown_all")
        .is_some_and(|v| v == &Value::Bool(true))
    {
        return Ok(None);
    }
    let bad = || {
        ApiError::BadRequest(
            "Give {\"slaves\": [<slave id>, ...]} or {\"shutdown_all\": true}.".into(),
        )
    };
    let ids = body
        .get("slaves")
        .and_then(Value::as_array)
        .ok_or_else(bad)?;
    ids.iter()
        .map(|v| match v {
            Value::Number(n) => n.as_u64(),
            // ClusterRunner applied int() to each id, so "3" works too.
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
        .collect::<Option<Vec<u64>>>()
        .map(Some)
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(body: Value) -> String {
        match build_request(&body).unwrap_err() {
            ApiError::Failure(Some(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn git_request() {
        let body = json!({"type": "GIT", "url": "https://x/r.git", "branch": "dev",
                          "hash": "abcdef1", "project_directory": "sub", "job_name": "J",
                          "config": {"commands": ["true"]}, "atoms_override": ["export A=\"1\";"],
                          "remote_files": {"f.txt": "http://h/f"}, "remote": null});
        let r = build_request(&body).unwrap();
        let Some(Kind::Git(g)) = r.source.unwrap().kind else {
            panic!()
        };
        assert_eq!(
            (
                g.url.as_str(),
                g.remote.as_str(),
                g.branch.as_str(),
                g.hash.as_str()
            ),
            ("https://x/r.git", "", "dev", "abcdef1")
        );
        assert_eq!(r.project_directory, "sub");
        assert_eq!(r.job_name, "J");
        assert_eq!(
            serde_json::from_str::<Value>(&r.config_json).unwrap(),
            json!({"commands": ["true"]})
        );
        assert_eq!(r.atoms_override, ["export A=\"1\";"]);
        assert_eq!(r.remote_files["f.txt"], "http://h/f");
        assert_eq!(r.origin, proto::BuildOrigin::Clusterrunner as i32);
        assert_eq!(
            serde_json::from_str::<Value>(&r.request_params_json).unwrap(),
            body
        );
    }

    #[test]
    fn directory_request() {
        let r = build_request(&json!({"type": "directory", "project_directory": "/p"})).unwrap();
        let Some(Kind::Directory(d)) = r.source.unwrap().kind else {
            panic!()
        };
        assert_eq!(d.path, "/p");
        assert_eq!(r.project_directory, "");
    }

    #[test]
    fn refusals() {
        assert_eq!(err(json!({})), "Invalid build request type.");
        assert_eq!(err(json!({"type": "svn"})), "Invalid build request type.");
        assert_eq!(
            err(json!({"type": "git"})),
            "Missing required parameter. Required parameters: ['url']"
        );
        assert_eq!(
            err(json!({"type": "directory"})),
            "Missing required parameter. Required parameters: ['project_directory']"
        );
        let m =
            err(json!({"type": "git", "url": "u", "colour": 1, "build_project_directory": "/x"}));
        assert!(
            m.starts_with(
                "Unknown parameter(s) for a git build: ['build_project_directory', 'colour']."
            ),
            "{m}"
        );
        let m = err(json!({"type": "directory", "project_directory": "/p", "branch": "x"}));
        assert!(m.contains("['branch']"), "{m}");
        assert_eq!(
            err(json!({"type": "git", "url": 3})),
            "Parameter \"url\" must be a string."
        );
        assert!(err(json!({"type": "git", "url": "u", "config": "a: b"})).contains("config"));
        assert!(
            err(json!({"type": "git", "url": "u", "atoms_override": [1]}))
                .contains("atoms_override")
        );
        assert!(
            err(json!({"type": "git", "url": "u", "remote_files": {"a": 1}}))
                .contains("remote_files")
        );
        assert!(build_request(&json!([1])).is_err());
    }

    #[test]
    fn cancel_validation_messages() {
        assert!(validate_cancel(&json!({"status": "canceled"})).is_ok());
        let msg = |b: Value| validate_cancel(&b).unwrap_err().to_string();
        assert_eq!(
            msg(json!({"badkey": "foo"})),
            "Key (badkey) is not in list of allowed keys (status)"
        );
        assert_eq!(
            msg(json!({"status": "foo"})),
            "Value (foo) is not in list of allowed values (['canceled']) for status"
        );
        assert_eq!(
            msg(json!({"status": true})),
            "Value (True) is not in list of allowed values (['canceled']) for status"
        );
        assert_eq!(
            msg(json!({"status": ["a", 1]})),
            "Value (['a', 1]) is not in list of allowed values (['canceled']) for status"
        );
        assert!(matches!(
            validate_cancel(&json!({})),
            Err(ApiError::Failure(None))
        ));
    }

    #[test]
    fn shutdown_bodies() {
        assert_eq!(
            shutdown_targets(&json!({"shutdown_all": true})).unwrap(),
            None
        );
        assert_eq!(
            shutdown_targets(&json!({"slaves": [1, "2"]})).unwrap(),
            Some(vec![1, 2])
        );
        assert!(shutdown_targets(&json!({})).is_err());
        assert!(shutdown_targets(&json!({"slaves": ["x"]})).is_err());
        assert!(shutdown_targets(&json!({"shutdown_all": false})).is_err());
    }
}
