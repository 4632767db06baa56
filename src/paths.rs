//! Validation of paths that come from the network (artifact file names, remote file names).

use std::path::PathBuf;

/// Longest relative path accepted, in bytes.
pub const MAX_RELATIVE_PATH: usize = 4096;

/// A `/`-separated relative path that stays inside the directory it is joined to: not empty, not
/// absolute, no `..`, `.` or empty components, no NUL or backslash, at most
/// [`MAX_RELATIVE_PATH`] bytes. Returns it as a `PathBuf`, or `None` if it is unsafe.
pub fn safe_relative_path(p: &str) -> Option<PathBuf> {
    if p.is_empty() || p.len() > MAX_RELATIVE_PATH || p.starts_with('/') || p.contains(['\0', '\\'])
    {
        return None;
    }
    let mut out = PathBuf::new();
    for part in p.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return None;
        }
        out.push(part);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_relative_paths() {
        assert_eq!(
            safe_relative_path("a/b.txt"),
            Some(PathBuf::from("a/b.txt"))
        );
        assert_eq!(
            safe_relative_path("..hidden"),
            Some(PathBuf::from("..hidden"))
        );
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\\b",
            "a\0b",
            "a/",
        ] {
            assert_eq!(safe_relative_path(bad), None, "{bad:?}");
        }
        assert_eq!(safe_relative_path(&"a".repeat(MAX_RELATIVE_PATH + 1)), None);
    }
}
