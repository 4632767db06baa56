use git2::{ErrorCode, ObjectType, Oid, Reference, Repository};

use super::fsutil::*;
use super::types::*;

/// A requested commit id.
#[derive(Debug, Clone)]
pub(super) enum HashSpec {
    Full(Oid),
    Prefix(String),
}

impl HashSpec {
    pub(super) fn parse(hash: &str) -> Result<Option<HashSpec>, GitError> {
        let hash = hash.trim();
        if hash.is_empty() {
            return Ok(None);
        }
        let invalid = |reason: &str| GitError::InvalidHash {
            hash: hash.to_owned(),
            reason: reason.to_owned(),
        };
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("a commit id is made of hexadecimal digits"));
        }
        let lower = hash.to_ascii_lowercase();
        match lower.len() {
            40 => Oid::from_str(&lower)
                .map(|oid| Some(HashSpec::Full(oid)))
                .map_err(|e| invalid(e.message())),
            n if n < MIN_ABBREV_HASH => Err(invalid(&format!(
                "at least {MIN_ABBREV_HASH} hexadecimal digits are required"
            ))),
            n if n > 40 => Err(invalid("a commit id has at most 40 hexadecimal digits")),
            _ => Ok(Some(HashSpec::Prefix(lower))),
        }
    }

    pub(super) fn text(&self) -> String {
        match self {
            HashSpec::Full(oid) => oid.to_string(),
            HashSpec::Prefix(p) => p.clone(),
        }
    }
}

/// Resolves `spec` in `repo` to a commit id; `None` when the object is not there.
pub(super) fn lookup_commit(
    repo: &Repository,
    shown_url: &str,
    spec: &HashSpec,
) -> Result<Option<Oid>, GitError> {
    let found = match spec {
        HashSpec::Full(oid) => repo.find_object(*oid, None),
        HashSpec::Prefix(prefix) => repo.find_object_by_prefix(prefix, None),
    };
    let object = match found {
        Ok(object) => object,
        Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
        Err(e) if e.code() == ErrorCode::Ambiguous => {
            return Err(GitError::InvalidHash {
                hash: spec.text(),
                reason: "it matches several objects; use more digits".to_owned(),
            });
        }
        Err(e) => {
            return Err(GitError::Cache {
                path: repo.path().to_owned(),
                message: describe(&e),
            });
        }
    };
    // An annotated tag id is as good as the commit it tags.
    match object.peel(ObjectType::Commit) {
        Ok(commit) => Ok(Some(commit.id())),
        Err(_) => Err(GitError::NotACommit {
            url: shown_url.to_owned(),
            hash: spec.text(),
            kind: object
                .kind()
                .map_or_else(|| "unknown object".to_owned(), |k| k.to_string()),
        }),
    }
}

/// The commit a freshly fetched ref points at (peeling annotated tags).
pub(super) fn peel_fetched(repo: &Repository, shown_url: &str, oid: Oid) -> Result<Oid, GitError> {
    lookup_commit(repo, shown_url, &HashSpec::Full(oid))?.ok_or_else(|| GitError::Fetch {
        url: shown_url.to_owned(),
        message: format!("the remote advertised {oid} but did not send it"),
    })
}

/// Chooses which advertised ref to fetch for `branch`: exact full refs, then `refs/heads/`, then
/// `refs/tags/`; an empty branch means `master`, else whatever the remote's HEAD points at.
pub(super) fn pick_remote_ref(
    heads: &[(String, Oid)],
    head_target: Option<&str>,
    branch: &str,
) -> Option<(String, Oid)> {
    let find = |name: &str| {
        heads
            .iter()
            .find(|(n, _)| n == name)
            .map(|(n, oid)| (n.clone(), *oid))
    };
    if branch.is_empty() {
        return find(&format!("refs/heads/{DEFAULT_BRANCH}"))
            .or_else(|| head_target.and_then(find))
            .or_else(|| find("HEAD"));
    }
    if branch == "HEAD" || branch.starts_with("refs/") {
        return find(branch);
    }
    find(&format!("refs/heads/{branch}")).or_else(|| find(&format!("refs/tags/{branch}")))
}

/// Where a remote ref is stored in the cache: branches as remote-tracking refs, tags as tags,
/// anything else in a private namespace so it cannot clash with either.
pub(super) fn local_ref_for(remote_name: &str, src: &str) -> String {
    if let Some(branch) = src.strip_prefix("refs/heads/") {
        format!("refs/remotes/{remote_name}/{branch}")
    } else if src.starts_with("refs/tags/") {
        src.to_owned()
    } else if let Some(rest) = src.strip_prefix("refs/") {
        format!("refs/ish/{remote_name}/{rest}")
    } else {
        format!("refs/remotes/{remote_name}/{src}")
    }
}

pub(super) fn validate_branch(branch: &str) -> Result<(), GitError> {
    if branch.is_empty() || branch == "HEAD" {
        return Ok(());
    }
    let full = if branch.starts_with("refs/") {
        branch.to_owned()
    } else {
        format!("refs/heads/{branch}")
    };
    if Reference::is_valid_name(&full) {
        Ok(())
    } else {
        Err(GitError::InvalidBranch {
            branch: branch.to_owned(),
        })
    }
}

/// Accepts absolute paths, `file://` URLs, network URLs and scp-like `[user@]host:path`.
pub(super) fn validate_url(url: &str) -> Result<(), GitError> {
    let invalid = |reason: &str| GitError::InvalidUrl {
        url: redact_url(url),
        reason: reason.to_owned(),
    };
    if url.trim().is_empty() {
        return Err(invalid("the url is empty"));
    }
    if url.trim() != url || url.contains(['\n', '\r', '\0']) {
        return Err(invalid("the url contains whitespace or control characters"));
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        return match scheme.to_ascii_lowercase().as_str() {
            "file" if rest.starts_with('/') => Ok(()),
            "file" => Err(invalid(
                "file urls must hold an absolute path (file:///path)",
            )),
            "http" | "https" | "ssh" | "git" | "git+ssh" | "ssh+git" if !rest.is_empty() => Ok(()),
            "http" | "https" | "ssh" | "git" | "git+ssh" | "ssh+git" => {
                Err(invalid("the url has no host"))
            }
            _ => Err(invalid(&format!("unsupported url scheme '{scheme}'"))),
        };
    }
    if url.starts_with('/') || is_scp_like(url) {
        return Ok(());
    }
    Err(invalid(
        "relative paths are not allowed; use an absolute path or a file:// url",
    ))
}

/// `[user@]host:path`, as git understands it: a colon before any slash.
pub(super) fn is_scp_like(url: &str) -> bool {
    match (url.find(':'), url.find('/')) {
        (Some(colon), slash) => colon > 0 && slash.is_none_or(|s| colon < s),
        (None, _) => false,
    }
}

/// The URL with any password replaced, for messages and logs.
pub(super) fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => {
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// `<host and path, sanitized and truncated>-<fnv1a64 of url>.git`.
pub(super) fn cache_dir_name(url: &str) -> String {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    // Drop user info: it is noise in a directory name and may hold a secret.
    let authority_end = without_scheme.find('/').unwrap_or(without_scheme.len());
    let without_user = match without_scheme[..authority_end].rfind('@') {
        Some(at) => &without_scheme[at + 1..],
        None => without_scheme,
    };
    let trimmed = without_user.trim_end_matches('/');
    let trimmed = trimmed.strip_suffix(".git").unwrap_or(trimmed);

    let mut readable = String::with_capacity(trimmed.len());
    for c in trimmed.chars() {
        let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            c
        } else {
            '_'
        };
        if !(c == '_' && readable.ends_with('_')) {
            readable.push(c);
        }
    }
    // Leading dots would hide the directory; the tail (repository name) is the telling part.
    let readable = readable.trim_matches(|c| c == '_' || c == '.');
    let readable = &readable[readable.len().saturating_sub(MAX_CACHE_NAME)..];
    let readable = readable.trim_start_matches(['_', '.']);
    let readable = if readable.is_empty() {
        "repo"
    } else {
        readable
    };
    format!("{readable}-{:016x}.git", fnv1a64(url.as_bytes()))
}

/// FNV-1a, 64 bit: stable across builds and platforms, unlike `std`'s hasher.
pub(super) fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}
