//! Python's string semantics, so error texts match ClusterRunner's byte for byte: `strip`,
//! `splitlines`, `repr` of strings, lists and sets; float formatting lives with the nodes.
use std::fmt::Write as _;

// Python string semantics
// ---------------------------------------------------------------------------------------

/// `str.isspace()`: Rust's whitespace plus the ASCII information separators.
pub(super) fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()`.
pub(super) fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// `str.splitlines()`: splits on every Unicode line boundary; `\r\n` counts once.
pub(super) fn py_splitlines(s: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let boundary = matches!(
            c,
            '\n' | '\r'
                | '\u{0b}'
                | '\u{0c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        );
        if boundary {
            lines.push(&s[start..i]);
            let mut end = i + c.len_utf8();
            if c == '\r'
                && let Some(&(j, '\n')) = chars.peek()
            {
                chars.next();
                end = j + 1;
            }
            start = end;
        }
    }
    if start < s.len() {
        lines.push(&s[start..]);
    }
    lines
}

/// Approximates `str.isprintable()` (exact for ASCII and the common format characters).
pub(super) fn py_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    let format_char = matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
    );
    !(c.is_control() || c.is_whitespace() || format_char)
}

/// `repr(str)`.
pub(super) fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if py_printable(c) => out.push(c),
            c => {
                let v = u32::from(c);
                // Writing to a String cannot fail.
                let _ = if v < 0x100 {
                    write!(out, "\\x{v:02x}")
                } else if v < 0x1_0000 {
                    write!(out, "\\u{v:04x}")
                } else {
                    write!(out, "\\U{v:08x}")
                };
            }
        }
    }
    out.push(quote);
    out
}

/// `repr(list_of_str)`.
pub(super) fn py_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| py_repr(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// `repr(set_of_str)`; an empty set would be `set()`, which never occurs here.
pub(super) fn py_set(items: &[String]) -> String {
    if items.is_empty() {
        return "set()".to_owned();
    }
    let inner: Vec<String> = items.iter().map(|s| py_repr(s)).collect();
    format!("{{{}}}", inner.join(", "))
}
