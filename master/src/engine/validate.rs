//! What a build request may be: checked at submission, before anything is stored, with
//! messages that name the offending field.
use super::invalid;
use crate::error::Result;
use ish_core::jobconfig;
use ish_core::proto::{self};

/// Most variables a build's `env` may set.
pub(super) const MAX_ENV_VARS: usize = 256;
/// Longest value of one `env` variable, in bytes.
pub(super) const MAX_ENV_VALUE: usize = 32 << 10;
/// Largest `env` in all (names and values), in bytes.
pub(super) const MAX_ENV_BYTES: usize = 256 << 10;

/// Most `remote_files` one build may ask for.
pub(super) const MAX_REMOTE_FILES: usize = 100;

/// Largest `request_params` a build may keep, once normalized (see `ish_core::jsontext`).
pub(super) const MAX_REQUEST_PARAMS_BYTES: usize = 2 << 20;

/// Checks a build request before anything is stored. Messages name the offending field.
/// Returns the inline job config, parsed once here for the build's whole path (the preparing
/// slave is sent the result).
pub fn validate_request(
    req: &proto::BuildRequest,
    max_atoms: usize,
) -> Result<Option<proto::JobConfig>> {
    use proto::project_source::Kind;
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        None => {
            return Err(invalid(
                "Invalid build request type: give a git or directory source.",
            ));
        }
        Some(Kind::Git(g)) => {
            if g.url.trim().is_empty() {
                return Err(invalid(
                    "Missing required parameter. Required parameters: ['url']",
                ));
            }
            // git would read a leading '-' as an option, whatever the transport.
            if g.url.starts_with('-') {
                return Err(invalid(format!(
                    "Invalid url \"{}\": a repository URL or path cannot start with '-'.",
                    g.url
                )));
            }
            if !g.hash.is_empty()
                && (g.hash.len() < 7
                    || g.hash.len() > 40
                    || !g.hash.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(format!(
                    "Invalid hash \"{}\": expected 7 to 40 hexadecimal digits.",
                    g.hash
                )));
            }
            if g.branch.starts_with('-') || g.remote.starts_with('-') || g.remote.contains('/') {
                return Err(invalid("Invalid branch or remote name."));
            }
        }
        Some(Kind::Directory(d)) => {
            if d.path.trim().is_empty() {
                return Err(invalid(
                    "Missing required parameter. Required parameters: ['project_directory']",
                ));
            }
            if !d.path.starts_with('/') {
                return Err(invalid(format!(
                    "project_directory \"{}\" must be an absolute path (it is looked up on the slaves).",
                    d.path
                )));
            }
        }
    }
    let pd = &req.project_directory;
    let has_nul = |s: &str| s.contains('\0');
    if has_nul(pd)
        || has_nul(&req.job_name)
        || req
            .source
            .as_ref()
            .and_then(|s| s.kind.as_ref())
            .is_some_and(|k| match k {
                Kind::Git(g) => has_nul(&g.url) || has_nul(&g.branch) || has_nul(&g.remote),
                Kind::Directory(d) => has_nul(&d.path),
            })
    {
        return Err(invalid(
            "Invalid build request: a path, URL, branch or job name cannot contain a NUL character.",
        ));
    }
    if pd.starts_with('/') || pd.split('/').any(|p| p == "..") {
        return Err(invalid(format!(
            "project_directory \"{pd}\" must be a relative path inside the repository, without \"..\"."
        )));
    }
    let inline_job = if req.config_json.is_empty() {
        None
    } else {
        let job = (!req.job_name.is_empty()).then_some(req.job_name.as_str());
        let parsed = jobconfig::parse_inline_config_str(&req.config_json, job)
            .map_err(|e| invalid(e.to_string()))?;
        Some(parsed)
    };
    if req.atoms_override.iter().any(|a| a.trim().is_empty()) {
        return Err(invalid("atoms_override entries must not be empty."));
    }
    for (name, url) in &req.remote_files {
        if ish_core::paths::safe_relative_path(name).is_none() {
            return Err(invalid(format!(
                "remote_files name \"{name}\" must be a relative path inside the project, without \"..\"."
            )));
        }
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(format!(
                "remote_files URL \"{url}\" for \"{name}\" must be http:// or https://."
            )));
        }
    }
    if req.remote_files.len() > MAX_REMOTE_FILES {
        return Err(invalid(format!(
            "at most {MAX_REMOTE_FILES} remote_files per build."
        )));
    }
    if req.atoms_override.len() > max_atoms {
        return Err(invalid(format!(
            "atoms_override has {} atoms; the limit is {max_atoms} (max_atoms_per_build).",
            req.atoms_override.len()
        )));
    }
    let env_bytes: usize = req.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if req.env.len() > MAX_ENV_VARS {
        return Err(invalid(format!(
            "env has {} names; the limit is {MAX_ENV_VARS}.",
            req.env.len()
        )));
    }
    if let Some((k, _)) = req.env.iter().find(|(_, v)| v.len() > MAX_ENV_VALUE) {
        return Err(invalid(format!(
            "env value of \"{k}\" is longer than {MAX_ENV_VALUE} bytes."
        )));
    }
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(format!(
            "env is {env_bytes} bytes in all; the limit is {MAX_ENV_BYTES}."
        )));
    }
    for k in req.env.keys() {
        let ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(invalid(format!(
                "env name \"{k}\" is not a valid variable name."
            )));
        }
    }
    Ok(inline_job)
}

/// The request as ClusterRunner's `request_params` (used when the client sent no JSON of its own).
pub(super) fn request_params_json(req: &proto::BuildRequest) -> String {
    use proto::project_source::Kind;
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.into(), v.into());
        }
    };
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Git(g)) => {
            put("type", "git");
            put("url", &g.url);
            put("remote", &g.remote);
            put("branch", &g.branch);
            put("hash", &g.hash);
            put("project_directory", &req.project_directory);
        }
        Some(Kind::Directory(d)) => {
            put("type", "directory");
            put("project_directory", &d.path);
        }
        None => {}
    }
    put("job_name", &req.job_name);
    if !req.config_json.is_empty()
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&req.config_json)
    {
        m.insert("config".into(), v);
    }
    // atoms_override is left out: the echo is read on every poll, the atoms can be 100,000.
    serde_json::Value::Object(m).to_string()
}

/// Timing history key of a project: the same repository (or directory) and sub-directory share
/// history, whatever branch or commit is built.
pub(super) fn project_key(req: &proto::BuildRequest) -> String {
    use proto::project_source::Kind;
    match req.source.as_ref().and_then(|s| s.kind.as_ref()) {
        Some(Kind::Git(g)) => format!(
            "git:{}//{}",
            g.url.trim_end_matches('/'),
            req.project_directory
        ),
        Some(Kind::Directory(d)) => format!(
            "dir:{}//{}",
            d.path.trim_end_matches('/'),
            req.project_directory
        ),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::MasterError;
    use proto::project_source::Kind;

    fn git(url: &str) -> proto::BuildRequest {
        proto::BuildRequest {
            source: Some(proto::ProjectSource {
                kind: Some(Kind::Git(proto::GitSource {
                    url: url.into(),
                    branch: "main".into(),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }
    }

    fn dir(path: &str) -> proto::BuildRequest {
        proto::BuildRequest {
            source: Some(proto::ProjectSource {
                kind: Some(Kind::Directory(proto::DirectorySource {
                    path: path.into(),
                })),
            }),
            ..Default::default()
        }
    }

    fn with_git(f: impl FnOnce(&mut proto::GitSource)) -> proto::BuildRequest {
        let mut r = git("https://example.com/r.git");
        if let Some(Kind::Git(g)) = r.source.as_mut().and_then(|s| s.kind.as_mut()) {
            f(g);
        }
        r
    }

    fn with(f: impl FnOnce(&mut proto::BuildRequest)) -> proto::BuildRequest {
        let mut r = dir("/srv/p");
        f(&mut r);
        r
    }

    /// Every refusal of the master's validation, each with the message that names the field
    /// (the REST and gRPC suites check the same through the real services).
    #[test]
    fn every_refusal_names_what_is_wrong() {
        let env = |pairs: &[(&str, String)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        let cases: Vec<(&str, proto::BuildRequest, &str)> = vec![
            (
                "no source",
                proto::BuildRequest::default(),
                "give a git or directory source",
            ),
            ("empty url", git("  "), "Required parameters: ['url']"),
            (
                "url as option",
                git("--upload-pack=x"),
                "cannot start with '-'",
            ),
            (
                "short hash",
                with_git(|g| g.hash = "abc".into()),
                "7 to 40 hexadecimal",
            ),
            (
                "long hash",
                with_git(|g| g.hash = "a".repeat(41)),
                "7 to 40 hexadecimal",
            ),
            (
                "hash not hex",
                with_git(|g| g.hash = "zzzzzzzz".into()),
                "7 to 40 hexadecimal",
            ),
            (
                "branch as option",
                with_git(|g| g.branch = "-x".into()),
                "Invalid branch or remote",
            ),
            (
                "remote as option",
                with_git(|g| g.remote = "-x".into()),
                "Invalid branch or remote",
            ),
            (
                "remote with slash",
                with_git(|g| g.remote = "a/b".into()),
                "Invalid branch or remote",
            ),
            ("empty directory", dir(""), "['project_directory']"),
            (
                "relative directory",
                dir("srv/p"),
                "must be an absolute path",
            ),
            (
                "NUL in url",
                with_git(|g| g.url.push('\0')),
                "NUL character",
            ),
            (
                "NUL in branch",
                with_git(|g| g.branch.push('\0')),
                "NUL character",
            ),
            ("NUL in path", dir("/srv/\0p"), "NUL character"),
            (
                "NUL in job",
                with(|r| r.job_name = "a\0".into()),
                "NUL character",
            ),
            (
                "absolute project_directory",
                with(|r| r.project_directory = "/etc".into()),
                "relative path inside the repository",
            ),
            (
                "escaping project_directory",
                with(|r| r.project_directory = "a/../..".into()),
                "relative path inside the repository",
            ),
            (
                "inline config not JSON",
                with(|r| r.config_json = "{".into()),
                "could not be parsed as JSON",
            ),
            (
                "empty atom",
                with(|r| r.atoms_override = vec!["  ".into()]),
                "atoms_override entries must not be empty",
            ),
            (
                "too many atoms",
                with(|r| r.atoms_override = vec!["a".into(); 11]),
                "the limit is 10 (max_atoms_per_build)",
            ),
            (
                "remote file outside",
                with(|r| {
                    r.remote_files.insert("../x".into(), "https://h/x".into());
                }),
                "must be a relative path inside the project",
            ),
            (
                "remote file scheme",
                with(|r| {
                    r.remote_files
                        .insert("x".into(), "file:///etc/passwd".into());
                }),
                "must be http:// or https://",
            ),
            (
                "too many remote files",
                with(|r| {
                    for i in 0..=MAX_REMOTE_FILES {
                        r.remote_files.insert(format!("f{i}"), "https://h/x".into());
                    }
                }),
                "at most 100 remote_files",
            ),
            (
                "too many env names",
                with(|r| {
                    r.env = (0..=MAX_ENV_VARS)
                        .map(|i| (format!("V{i}"), String::new()))
                        .collect();
                }),
                "the limit is 256",
            ),
            (
                "env value too long",
                with(|r| r.env = env(&[("BIG", "x".repeat(MAX_ENV_VALUE + 1))])),
                "env value of \"BIG\" is longer than",
            ),
            (
                "env too large in all",
                with(|r| {
                    r.env = (0..10)
                        .map(|i| (format!("V{i}"), "x".repeat(MAX_ENV_VALUE)))
                        .collect();
                }),
                "bytes in all; the limit is",
            ),
            (
                "env name with dash",
                with(|r| r.env = env(&[("A-B", String::new())])),
                "env name \"A-B\" is not a valid variable name",
            ),
            (
                "env name with digit first",
                with(|r| r.env = env(&[("1A", String::new())])),
                "is not a valid variable name",
            ),
            (
                "empty env name",
                with(|r| r.env = env(&[("", String::new())])),
                "is not a valid variable name",
            ),
        ];
        let mut wrong = Vec::new();
        for (what, req, message) in &cases {
            match validate_request(req, 10) {
                Err(MasterError::InvalidArgument(m)) if m.contains(message) => {}
                other => wrong.push(format!("{what}: {other:?}")),
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// Requests at every limit pass, and an inline config comes back parsed.
    #[test]
    fn requests_at_the_limits_pass_and_an_inline_config_is_parsed() {
        let mut r = dir("/srv/p");
        r.project_directory = "sub/dir".into();
        r.atoms_override = vec!["export A=1;".into(); 10];
        r.env = (0..MAX_ENV_VARS)
            .map(|i| (format!("_V{i}"), "v".into()))
            .collect();
        for i in 0..MAX_REMOTE_FILES {
            r.remote_files
                .insert(format!("d/f{i}"), "http://h/x".into());
        }
        assert_eq!(validate_request(&r, 10).unwrap(), None);
        r.config_json = r#"{"commands": ["echo $A"], "atomizers": [{"A": "seq 1 2"}]}"#.into();
        r.job_name = "Job".into();
        let job = validate_request(&r, 10).unwrap().expect("parsed");
        assert_eq!(job.name, "Job");
        assert!(job.commands.contains("echo $A"), "{job:?}");
        let mut g = with_git(|g| g.hash = "0123abcdef".into());
        g.env.insert("_".into(), String::new());
        assert!(validate_request(&g, 10).is_ok());
    }
}
