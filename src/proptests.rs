//! Property tests of the parsers that read untrusted input (issue 4): job configs (YAML and
//! inline JSON), command joining, atomizer output, console paging, message digests and network
//! paths. Each property either states an invariant or compares the code with a small reference
//! implementation of the spec rule written here (`/work/shared/spec/clusterrunner.md` §10.1,
//! §10.3, §11.3), on generated input.
use crate::proto::{Atomizer, JobConfig};
use crate::{auth, console, jobconfig, paths};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Map, Value, json};
use std::path::{Component, Path, PathBuf};

/// 256 cases per property keeps the whole suite to a few seconds; no regression files are
/// written into the source tree.
fn config() -> Config {
    Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Reference implementations of the spec rules
// ---------------------------------------------------------------------------------------------

/// Python's `str.isspace()`: Unicode White_Space plus the four ASCII separators \x1c-\x1f.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// Spec §10.1, literally: skip nulls; trim each entry and strip its trailing `;`s; append
/// " && " unless the trimmed entry ends with `&` (then " "); trim the result; if it ends with
/// `&&`, strip every trailing `&` and trim again.
fn reference_join(commands: &[Option<String>]) -> String {
    let mut joined = String::new();
    for c in commands.iter().flatten() {
        let entry = py_strip(c).trim_end_matches(';');
        joined += entry;
        joined += if py_strip(entry).ends_with('&') {
            " "
        } else {
            " && "
        };
    }
    let joined = py_strip(&joined);
    if joined.ends_with("&&") {
        py_strip(joined.trim_end_matches('&')).to_string()
    } else {
        joined.to_string()
    }
}

fn join(commands: &[Option<String>]) -> String {
    let refs: Vec<Option<&str>> = commands.iter().map(Option::as_deref).collect();
    jobconfig::join_commands(&refs)
}

/// Python's `str.splitlines()`, written differently from the code's: normalise `\r\n`, then
/// split on every line boundary and drop the empty piece after a final boundary.
fn reference_splitlines(s: &str) -> Vec<String> {
    const BOUNDARIES: [char; 10] = [
        '\n', '\r', '\u{0b}', '\u{0c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
        '\u{2029}',
    ];
    if s.is_empty() {
        return Vec::new();
    }
    let s = s.replace("\r\n", "\n");
    let mut lines: Vec<String> = s.split(BOUNDARIES).map(str::to_string).collect();
    if s.ends_with(BOUNDARIES) {
        lines.pop();
    }
    lines
}

/// Spec §11.3 over the data split into lines up front (the code never splits).
fn reference_page(
    data: &[u8],
    max_lines: u64,
    offset_line: Option<u64>,
) -> Result<console::ConsolePage, console::ConsoleError> {
    if max_lines == 0 {
        return Err(console::ConsoleError::BadMaxLines);
    }
    let mut complete: Vec<&[u8]> = data.split_inclusive(|&b| b == b'\n').collect();
    let partial = complete.last().is_some_and(|l| !l.ends_with(b"\n"));
    if partial {
        complete.pop();
    }
    let k = complete.len() as u64;
    let p = u64::from(partial);
    let text = |lines: &[&[u8]]| String::from_utf8_lossy(&lines.concat()).into_owned();
    match offset_line {
        None => {
            let n = max_lines.min(k);
            Ok(console::ConsolePage {
                offset_line: k - n,
                num_lines: n,
                total_num_lines: k,
                content: text(&complete[(k - n) as usize..]),
            })
        }
        Some(o) => {
            if o > k + p {
                return Err(console::ConsoleError::OffsetPastEnd {
                    offset_line: o,
                    total_lines: k + p,
                });
            }
            let n = max_lines.min(k.saturating_sub(o));
            let start = o.min(k) as usize;
            // Reading on after a full page counts the rest, a partial line included; a page
            // that ended early already consumed (and did not count) the partial line.
            let total = if n == max_lines { k + p } else { o + n };
            Ok(console::ConsolePage {
                offset_line: o,
                num_lines: n,
                total_num_lines: total,
                content: text(&complete[start..start + n as usize]),
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Arbitrary JSON values, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("commands"),
            Just("atomizers"),
            Just("setup_build"),
            Just("teardown_build"),
            Just("max_executors"),
            Just("retries"),
            Just("atom_timeout"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Object keys: mostly section names, so generated configs get past the first checks.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop_oneof![
            Just("commands"),
            Just("atomizers"),
            Just("setup_build"),
            Just("teardown_build"),
            Just("max_executors"),
            Just("max_executors_per_slave"),
            Just("retries"),
            Just("atom_timeout"),
            Just("build_timeout"),
        ]
        .prop_map(str::to_string),
        1 => "[A-Za-z_][A-Za-z0-9_-]{0,6}",
        1 => ".{0,8}",
    ]
}

/// Text made of the characters that matter to YAML and JSON parsers.
fn syntax_soup() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_ :\\-\\[\\]{},&*!|>'\"#\\n\\t%@?<=.;\\\\~]{0,200}"
}

/// A shell command as users write them (printable ASCII, never empty after trimming).
fn command() -> impl Strategy<Value = String> {
    "[ -~]{0,3}[!-~][ -~]{0,24}"
}

/// A command list: the first entry is a string (the spec's type check), later ones may be null.
fn command_list() -> impl Strategy<Value = Vec<Option<String>>> {
    (
        command(),
        prop::collection::vec(prop::option::weighted(0.8, command()), 0..5),
    )
        .prop_map(|(first, rest)| std::iter::once(Some(first)).chain(rest).collect())
}

fn identifier() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,11}"
}

/// The parts of one valid job, and what the parser must make of them.
#[derive(Debug, Clone)]
struct JobParts {
    commands: Vec<Option<String>>,
    atomizers: Vec<(String, String)>,
    setup: Option<Vec<Option<String>>>,
    teardown: Option<Vec<Option<String>>>,
    max_executors: Option<u32>,
    max_executors_per_slave: Option<u32>,
    retries: Option<u32>,
    atom_timeout: Option<u32>,
    build_timeout: Option<u32>,
}

impl JobParts {
    fn to_json(&self) -> Value {
        let list = |l: &[Option<String>]| json!(l);
        let mut m = Map::new();
        m.insert("commands".into(), list(&self.commands));
        m.insert(
            "atomizers".into(),
            Value::Array(
                self.atomizers
                    .iter()
                    .map(|(k, v)| json!({ k.clone(): v }))
                    .collect(),
            ),
        );
        if let Some(s) = &self.setup {
            m.insert("setup_build".into(), list(s));
        }
        if let Some(t) = &self.teardown {
            m.insert("teardown_build".into(), list(t));
        }
        for (key, v) in [
            ("max_executors", self.max_executors),
            ("max_executors_per_slave", self.max_executors_per_slave),
            ("retries", self.retries),
            ("atom_timeout", self.atom_timeout),
            ("build_timeout", self.build_timeout),
        ] {
            if let Some(v) = v {
                m.insert(key.into(), json!(v));
            }
        }
        Value::Object(m)
    }

    /// The config the parser must return, named `name`.
    fn expected(&self, name: &str) -> JobConfig {
        let joined =
            |l: &Option<Vec<Option<String>>>| l.as_deref().map(reference_join).unwrap_or_default();
        JobConfig {
            name: name.to_string(),
            commands: reference_join(&self.commands),
            atomizers: self
                .atomizers
                .iter()
                .map(|(variable, command)| Atomizer {
                    variable: variable.clone(),
                    command: command.clone(),
                })
                .collect(),
            setup_build: joined(&self.setup),
            teardown_build: joined(&self.teardown),
            max_executors: self.max_executors.unwrap_or(0),
            max_executors_per_slave: self.max_executors_per_slave.unwrap_or(0),
            retries: self.retries.unwrap_or(0),
            atom_timeout_seconds: self.atom_timeout.unwrap_or(0),
            build_timeout_seconds: self.build_timeout.unwrap_or(0),
            dispatch: 0,
        }
    }
}

fn job_parts() -> impl Strategy<Value = JobParts> {
    (
        command_list(),
        prop::collection::vec((identifier(), command()), 1..4),
        prop::option::of(command_list()),
        prop::option::of(command_list()),
        prop::option::of(1..=u32::MAX),
        prop::option::of(1..=u32::MAX),
        prop::option::of(0..=jobconfig::MAX_RETRIES),
        prop::option::of(1..=u32::MAX),
        prop::option::of(1..=u32::MAX),
    )
        .prop_map(
            |(
                commands,
                atomizers,
                setup,
                teardown,
                max_executors,
                max_executors_per_slave,
                retries,
                atom_timeout,
                build_timeout,
            )| JobParts {
                commands,
                atomizers,
                setup,
                teardown,
                max_executors,
                max_executors_per_slave,
                retries,
                atom_timeout,
                build_timeout,
            },
        )
}

/// Job names (YAML keys): any text the YAML emitter has to quote or not.
fn job_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z][A-Za-z0-9_-]{0,15}",
        "[ -~]{1,12}",
        Just("null".to_string()),
        Just("true".to_string()),
        Just("123".to_string()),
    ]
}

/// What every accepted config must satisfy, whatever the input was.
fn assert_valid(c: &JobConfig) -> Result<(), TestCaseError> {
    prop_assert!(!c.atomizers.is_empty(), "accepted without atomizers: {c:?}");
    for a in &c.atomizers {
        let mut chars = a.variable.chars();
        prop_assert!(
            chars
                .next()
                .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
                && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_'),
            "accepted atomizer variable {:?}",
            a.variable
        );
    }
    prop_assert!(c.retries <= jobconfig::MAX_RETRIES);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Job configuration
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn job_config_parsers_never_panic_on_text(text in prop_oneof![any::<String>(), syntax_soup()],
                                              name in prop::option::of(".{0,6}")) {
        if let Ok(c) = jobconfig::parse_project_yaml(&text, name.as_deref()) {
            assert_valid(&c)?;
        }
        if let Ok(c) = jobconfig::parse_inline_config_str(&text, name.as_deref()) {
            assert_valid(&c)?;
        }
    }

    #[test]
    fn inline_config_never_panics_and_both_entry_points_agree(v in json_value(),
                                                              name in prop::option::of("[A-Za-z]{1,6}")) {
        let from_value = jobconfig::parse_inline_config(&v, name.as_deref());
        // serde_json's Value keeps keys sorted, so its text has the same order as the value.
        let from_text = jobconfig::parse_inline_config_str(&v.to_string(), name.as_deref());
        prop_assert_eq!(&from_value, &from_text, "{}", v);
        if let Ok(c) = from_value {
            assert_valid(&c)?;
        }
        // The same value as a clusterrunner.yaml job.
        let doc = json!({ name.clone().unwrap_or_else(|| "J".into()): v });
        let yaml = serde_norway::to_string(&doc).unwrap();
        if let Ok(c) = jobconfig::parse_project_yaml(&yaml, None) {
            assert_valid(&c)?;
        }
    }

    #[test]
    fn deeply_nested_yaml_is_refused_not_fatal(depth in 1usize..3000, style in 0u8..3) {
        let text = match style {
            0 => format!("J: {}x{}\n", "[".repeat(depth), "]".repeat(depth)),
            1 => format!("J:\n{}x\n", "- ".repeat(depth)),
            _ => format!("J: {}x{}\n", "{a: ".repeat(depth), "}".repeat(depth)),
        };
        // The top-level mapping is one level, each list or mapping below it one more.
        let r = jobconfig::parse_project_yaml(&text, None);
        if depth >= jobconfig::MAX_CONFIG_DEPTH {
            prop_assert_eq!(r, Err(jobconfig::JobConfigError::TooDeep));
        } else {
            prop_assert!(r.is_err(), "{:?}", r);
            prop_assert_ne!(r, Err(jobconfig::JobConfigError::TooDeep));
        }
    }

    #[test]
    fn a_valid_inline_config_round_trips(parts in job_parts(), name in prop::option::of(job_name())) {
        let v = parts.to_json();
        let got = jobconfig::parse_inline_config_str(&v.to_string(), name.as_deref());
        prop_assert_eq!(got, Ok(parts.expected(name.as_deref().unwrap_or(""))), "{}", v);
        let got = jobconfig::parse_inline_config(&v, name.as_deref());
        prop_assert_eq!(got, Ok(parts.expected(name.as_deref().unwrap_or(""))), "{}", v);
    }

    #[test]
    fn a_valid_project_yaml_round_trips(jobs in prop::collection::vec((job_name(), job_parts()), 1..4),
                                        pick in any::<prop::sample::Index>()) {
        // Later duplicates of a name replace earlier ones (PyYAML); keep names unique.
        let mut seen = std::collections::HashSet::new();
        let jobs: Vec<(String, JobParts)> =
            jobs.into_iter().filter(|(n, _)| seen.insert(n.clone())).collect();
        let mut doc = Map::new();
        for (n, p) in &jobs {
            doc.insert(n.clone(), p.to_json());
        }
        let yaml = serde_norway::to_string(&Value::Object(doc)).unwrap();
        let (name, parts) = &jobs[pick.index(jobs.len())];
        prop_assert_eq!(
            jobconfig::parse_project_yaml(&yaml, Some(name)),
            Ok(parts.expected(name)),
            "{}",
            yaml
        );
        let unnamed = jobconfig::parse_project_yaml(&yaml, None);
        if jobs.len() == 1 {
            prop_assert_eq!(unnamed, Ok(parts.expected(name)), "{}", yaml);
        } else {
            let is_not_specified = matches!(
                unnamed,
                Err(jobconfig::JobConfigError::JobNotSpecified { .. })
            );
            prop_assert!(is_not_specified, "{:?}", unnamed);
        }
        let missing = format!("{name}-missing");
        let is_not_found = matches!(
            jobconfig::parse_project_yaml(&yaml, Some(&missing)),
            Err(jobconfig::JobConfigError::JobNotFound { .. })
        );
        prop_assert!(is_not_found);
    }

    #[test]
    fn an_invalid_section_value_is_refused(parts in job_parts(),
                                           section in prop_oneof![
                                               Just("max_executors"),
                                               Just("max_executors_per_slave"),
                                               Just("atom_timeout"),
                                               Just("build_timeout"),
                                           ],
                                           bad in -1_000_000i64..=0,
                                           retries in prop_oneof![-1_000i64..0, 11i64..1_000],
                                           var in "[0-9-][A-Za-z0-9_-]{0,6}|[A-Za-z_]{1,4}[- .$][A-Za-z0-9]{0,3}") {
        let mut v = parts.to_json();
        v[section] = json!(bad);
        let is_non_positive = matches!(
            jobconfig::parse_inline_config(&v, Some("J")),
            Err(jobconfig::JobConfigError::NonPositiveMaxExecutors { .. })
        );
        prop_assert!(is_non_positive, "{}", v);
        let mut v = parts.to_json();
        v["retries"] = json!(retries);
        let is_bad_retries = matches!(
            jobconfig::parse_inline_config(&v, Some("J")),
            Err(jobconfig::JobConfigError::BadRetries { .. })
        );
        prop_assert!(is_bad_retries, "{}", v);
        let mut v = parts.to_json();
        v["atomizers"] = json!([{ var.clone(): "ls" }]);
        let is_bad_variable = matches!(
            jobconfig::parse_inline_config(&v, Some("J")),
            Err(jobconfig::JobConfigError::InvalidAtomizerVariable { .. })
        );
        prop_assert!(is_bad_variable, "{}", v);
    }
}

// ---------------------------------------------------------------------------------------------
// Command joining and atoms
// ---------------------------------------------------------------------------------------------

/// Entries with every character the joining rule treats specially.
fn tricky_entry() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("&".to_string()),
            Just("&&".to_string()),
            Just(";".to_string()),
            Just(" ".to_string()),
            Just("\t".to_string()),
            Just("\n".to_string()),
            Just("\u{1c}".to_string()),
            Just("\u{a0}".to_string()),
            Just("\u{3000}".to_string()),
            "[a-z$\"'|>]{1,4}",
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat())
}

/// A well-formed entry: a command without `&`, maybe backgrounded (` &`), maybe with trailing
/// `;`s, with whitespace around.
fn plain_entry() -> impl Strategy<Value = (String, String)> {
    (
        "[ \t]{0,2}",
        "[a-z0-9_$=\"'./|>-][a-z0-9 _$=\"'./|>-]{0,15}[a-z0-9_$=\"'./|>-]",
        prop::bool::ANY,
        ";{0,3}",
        "[ \t]{0,2}",
    )
        .prop_map(|(pre, body, background, semis, post)| {
            let core = if background {
                format!("{body} &")
            } else {
                body
            };
            (format!("{pre}{core}{semis}{post}"), core)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn join_matches_the_spec_rule(commands in prop::collection::vec(prop::option::weighted(0.85, tricky_entry()), 0..6)) {
        let got = join(&commands);
        prop_assert_eq!(&got, &reference_join(&commands), "{:?}", commands);
        prop_assert_eq!(py_strip(&got), got.as_str(), "leading/trailing whitespace");
    }

    #[test]
    fn join_of_well_formed_commands(entries in prop::collection::vec(prop::option::weighted(0.85, plain_entry()), 0..6)) {
        let commands: Vec<Option<String>> =
            entries.iter().map(|e| e.as_ref().map(|(raw, _)| raw.clone())).collect();
        let got = join(&commands);
        prop_assert_eq!(&got, &reference_join(&commands));
        prop_assert!(!got.ends_with("&&"), "{:?} -> {:?}", commands, got);
        prop_assert!(!got.ends_with(';') && !got.starts_with("&&"), "{:?}", got);
        prop_assert_eq!(py_strip(&got), got.as_str());
        // Every command appears, in order, without its trailing `;`s.
        let mut rest = got.as_str();
        for (_, core) in entries.iter().flatten() {
            let at = rest.find(core.as_str());
            prop_assert!(at.is_some(), "{:?} missing from {:?}", core, got);
            rest = &rest[at.unwrap() + core.len()..];
        }
        let n = entries.iter().flatten().count();
        if n == 0 {
            prop_assert_eq!(got, "");
        } else {
            // Separators: " && " after a foreground command, " " after a background one.
            let foreground = entries.iter().flatten().take(n - 1).filter(|(_, c)| !c.ends_with('&')).count();
            prop_assert_eq!(got.matches(" && ").count(), foreground, "{:?}", got);
        }
    }

    #[test]
    fn atoms_are_one_export_per_line(lines in prop::collection::vec("[^\n\r\u{b}\u{c}\u{1c}-\u{1e}\u{85}\u{2028}\u{2029}]{0,12}", 0..8),
                                     pre in "[ \t\n]{0,3}", post in "[ \t\n]{0,3}",
                                     var in identifier()) {
        let output = format!("{pre}{}{post}", lines.join("\n"));
        let atoms = jobconfig::atoms_from_output(&var, &output, "");
        let want: Vec<String> = reference_splitlines(py_strip(&output))
            .into_iter()
            .map(|l| format!("export {var}=\"{l}\";"))
            .collect();
        prop_assert_eq!(&atoms, &want);
        if !lines.is_empty() && lines.iter().all(|l| !l.is_empty() && py_strip(l) == l.as_str()) {
            prop_assert_eq!(atoms.len(), lines.len());
        }
    }

    #[test]
    fn atoms_of_any_output(output in any::<String>(), var in identifier()) {
        let atoms = jobconfig::atoms_from_output(&var, &output, "");
        prop_assert_eq!(atoms.len(), reference_splitlines(py_strip(&output)).len());
        let prefix = format!("export {var}=\"");
        for a in &atoms {
            prop_assert!(a.starts_with(&prefix) && a.ends_with("\";"), "{:?}", a);
        }
    }

    #[test]
    fn atoms_replace_the_project_dir(names in prop::collection::vec("[a-z0-9_.]{1,8}", 1..6),
                                     dir in "/[a-z]{1,6}(/[a-z]{1,6}){0,2}") {
        let output: String = names.iter().map(|n| format!("{dir}/{n}\n")).collect();
        let atoms = jobconfig::atoms_from_output("F", &output, &dir);
        // Every occurrence is replaced (`/a/a` under `/a` is `$PROJECT_DIR$PROJECT_DIR`).
        let want: Vec<String> = names
            .iter()
            .map(|n| format!("export F=\"{}\";", format!("{dir}/{n}").replace(&dir, "$PROJECT_DIR")))
            .collect();
        prop_assert_eq!(&atoms, &want);
        for a in &atoms {
            prop_assert!(a.starts_with("export F=\"$PROJECT_DIR") && !a.contains(&dir), "{}", a);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Console paging
// ---------------------------------------------------------------------------------------------

/// Bytes with many newlines, some `\r`, some invalid UTF-8.
fn console_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => Just(b'\n'),
            4 => b'a'..=b'z',
            1 => Just(b'\r'),
            1 => any::<u8>(),
        ],
        0..300,
    )
}

fn max_lines() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 1u64..12, 1 => Just(u64::MAX), 1 => any::<u64>()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn console_page_matches_the_reference(data in prop_oneof![console_bytes(), prop::collection::vec(any::<u8>(), 0..64)],
                                          max in max_lines(),
                                          offset in prop::option::of(prop_oneof![4 => 0u64..40, 1 => any::<u64>()])) {
        prop_assert_eq!(
            console::page(&data, max, offset),
            reference_page(&data, max, offset),
            "{:?}", String::from_utf8_lossy(&data)
        );
    }

    #[test]
    fn console_pages_read_in_small_chunks_match_the_reference(
        data in console_bytes(),
        max in max_lines(),
        offset in prop::option::of(prop_oneof![4 => 0u64..40, 1 => any::<u64>()]),
        chunk in 1usize..9,
        max_bytes in prop_oneof![1 => Just(u64::MAX), 3 => 0u64..80],
    ) {
        // ASCII, so that the page's size in bytes is its content's length.
        let data: Vec<u8> = data.iter().map(|b| b & 0x7f).collect();
        let got = console::page_in_chunks(
            std::io::Cursor::new(&data), data.len() as u64, max, offset, max_bytes, chunk,
        ).unwrap();
        let want = match reference_page(&data, max, offset) {
            Ok(p) if p.content.len() as u64 > max_bytes => {
                Err(console::ConsoleError::PageTooLarge { max_bytes })
            }
            other => other,
        };
        prop_assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&data));
    }

    #[test]
    fn zero_max_lines_is_refused(data in console_bytes(), offset in prop::option::of(any::<u64>())) {
        prop_assert_eq!(console::page(&data, 0, offset), Err(console::ConsoleError::BadMaxLines));
    }

    #[test]
    fn console_pages_of_k_lines(lines in prop::collection::vec("[a-z ]{0,6}", 0..30),
                                partial in prop::option::of("[a-z]{1,6}"),
                                max in 1u64..40,
                                offset in 0u64..40) {
        let k = lines.len() as u64;
        let mut data: String = lines.iter().map(|l| format!("{l}\n")).collect();
        if let Some(p) = &partial {
            data += p;
        }
        let p = u64::from(partial.is_some());
        let slice = |from: u64, n: u64| -> String {
            lines[from as usize..(from + n) as usize].iter().map(|l| format!("{l}\n")).collect()
        };

        // Tail: the last min(max, k) complete lines, ending at the last complete one.
        let t = console::page(data.as_bytes(), max, None).unwrap();
        let n = max.min(k);
        prop_assert_eq!(
            t,
            console::ConsolePage { offset_line: k - n, num_lines: n, total_num_lines: k, content: slice(k - n, n) }
        );

        // Offset: lines [offset, offset + max) clipped to the complete ones.
        let r = console::page(data.as_bytes(), max, Some(offset));
        if offset > k + p {
            prop_assert_eq!(r, Err(console::ConsoleError::OffsetPastEnd { offset_line: offset, total_lines: k + p }));
        } else {
            let page = r.unwrap();
            let n = max.min(k.saturating_sub(offset));
            prop_assert_eq!(page.offset_line, offset);
            prop_assert_eq!(page.num_lines, n);
            prop_assert_eq!(&page.content, &slice(offset.min(k), n));
            // §11.3: lines read so far + the rest counted by reading on; the partial line is
            // counted only when the page stopped because of max_lines.
            let total = if n == max { k + p } else { offset + n };
            prop_assert_eq!(page.total_num_lines, total);
            prop_assert!(page.total_num_lines == k || page.total_num_lines == k + p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------------------------

fn secret() -> impl Strategy<Value = String> {
    "[!-~]{8,80}"
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_digest_verifies(secret in secret(), body in prop::collection::vec(any::<u8>(), 0..512)) {
        let d = auth::digest(&secret, &body);
        prop_assert_eq!(d.len(), 128);
        prop_assert!(d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{}", d);
        prop_assert!(auth::verify_digest(&secret, &body, &d));
        prop_assert!(auth::verify_digest(&secret, &body, &d.to_uppercase()));
        let mixed: String = d
            .chars()
            .enumerate()
            .map(|(i, c)| if i % 3 == 0 { c.to_ascii_uppercase() } else { c })
            .collect();
        prop_assert!(auth::verify_digest(&secret, &body, &mixed));
    }

    #[test]
    fn a_changed_body_or_digest_fails(secret in secret(),
                                      body in prop::collection::vec(any::<u8>(), 1..256),
                                      at in any::<prop::sample::Index>(),
                                      flip in 1u8..=255,
                                      hex_delta in 1u8..16) {
        let d = auth::digest(&secret, &body);
        let mut other = body.clone();
        let i = at.index(other.len());
        other[i] ^= flip;
        prop_assert!(!auth::verify_digest(&secret, &other, &d));
        // One hex digit of the digest changed to another value.
        let j = at.index(d.len());
        let digit = u8::from_str_radix(&d[j..=j], 16).unwrap();
        let new = char::from_digit(u32::from((digit + hex_delta) % 16), 16).unwrap();
        let mut bad = d.clone();
        bad.replace_range(j..=j, &new.to_string());
        prop_assert!(!auth::verify_digest(&secret, &body, &bad), "{} vs {}", bad, d);
        prop_assert!(!auth::verify_digest(&secret, &body, &bad.to_uppercase()));
    }

    #[test]
    fn a_sign_in_a_digest_is_refused(secret in secret(), body in prop::collection::vec(any::<u8>(), 0..64)) {
        // `+7` is not two hex digits, even though `u8::from_str_radix("+7", 16)` is 7.
        let d = auth::digest(&secret, &body);
        for j in (0..d.len()).step_by(2).filter(|&j| &d[j..=j] == "0") {
            let mut bad = d.clone();
            bad.replace_range(j..=j, "+");
            prop_assert!(!auth::verify_digest(&secret, &body, &bad), "accepted {:?}", bad);
        }
    }

    #[test]
    fn another_secret_fails(a in secret(), b in secret(), body in prop::collection::vec(any::<u8>(), 0..64)) {
        prop_assume!(a != b);
        prop_assert!(!auth::verify_digest(&b, &body, &auth::digest(&a, &body)));
    }

    #[test]
    fn garbage_digests_fail_without_panicking(secret in secret(),
                                              body in prop::collection::vec(any::<u8>(), 0..64),
                                              garbage in prop_oneof![any::<String>(), "[0-9a-fA-F]{0,140}", "[0-9a-f]{127}", "[0-9a-z]{128}"],
                                              cut in 0usize..128,
                                              at in any::<prop::sample::Index>(),
                                              junk in "[g-zG-Z\\-+ /\u{e9}\u{1F600}]") {
        prop_assert!(!auth::verify_digest(&secret, &body, &garbage), "{:?}", garbage);
        let d = auth::digest(&secret, &body);
        // Odd lengths, truncated and extended digests.
        prop_assert!(!auth::verify_digest(&secret, &body, &d[..cut]));
        prop_assert!(!auth::verify_digest(&secret, &body, &d[1..]));
        let longer = [format!("{d}0"), format!("{d}00")];
        prop_assert!(!auth::verify_digest(&secret, &body, &longer[0]));
        prop_assert!(!auth::verify_digest(&secret, &body, &longer[1]));
        // A non-hex character in place of one digit (or two bytes of a multi-byte char).
        let j = at.index(d.len());
        let mut bad = d.clone();
        bad.replace_range(j..=j, &junk);
        prop_assert!(!auth::verify_digest(&secret, &body, &bad), "{:?}", bad);
    }
}

// ---------------------------------------------------------------------------------------------
// Paths from the network
// ---------------------------------------------------------------------------------------------

/// `/`-joined parts, many of them the dangerous ones.
fn path_text() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        3 => "[a-zA-Z0-9_.-]{1,6}",
        1 => Just("..".to_string()),
        1 => Just(".".to_string()),
        1 => Just(String::new()),
        1 => Just("...".to_string()),
        1 => "[\\\\\0~:*?]{1,2}",
        1 => ".{1,4}",
    ];
    (
        prop::bool::weighted(0.15),
        prop::collection::vec(part, 1..6),
    )
        .prop_map(|(abs, parts)| format!("{}{}", if abs { "/" } else { "" }, parts.join("/")))
}

/// `base` joined with `rel`, with `..` and `.` applied lexically.
fn normalised(base: &Path, rel: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn accepted_paths_stay_inside(text in prop_oneof![3 => path_text(), 1 => any::<String>()]) {
        let base = Path::new("/srv/ish/results/7/.attempts/42/artifact_0_1");
        let Some(p) = paths::safe_relative_path(&text) else {
            return Ok(());
        };
        prop_assert!(!p.is_absolute(), "{:?}", text);
        let parts: Vec<&str> = text.split('/').collect();
        prop_assert!(parts.iter().all(|s| !s.is_empty() && *s != "." && *s != ".."), "{:?}", text);
        prop_assert!(!text.contains(['\\', '\0']), "{:?}", text);
        prop_assert!(text.len() <= paths::MAX_RELATIVE_PATH);
        prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))), "{:?}", p);
        prop_assert_eq!(p.components().count(), parts.len());
        let joined = base.join(&p);
        prop_assert!(joined.starts_with(base));
        prop_assert!(normalised(base, &p).starts_with(base));
        prop_assert_eq!(normalised(base, &p), joined);
    }

    #[test]
    fn dangerous_paths_are_refused(text in path_text()) {
        let parts: Vec<&str> = text.split('/').collect();
        let dangerous = text.starts_with('/')
            || parts.iter().any(|s| s.is_empty() || *s == "." || *s == "..")
            || text.contains(['\\', '\0']);
        if dangerous {
            prop_assert_eq!(paths::safe_relative_path(&text), None, "{:?}", text);
        } else {
            prop_assert_eq!(paths::safe_relative_path(&text), Some(PathBuf::from(&text)));
        }
    }

    #[test]
    fn over_long_paths_are_refused(part in "[a-z]{1,20}", extra in 1usize..64) {
        let mut text = part.clone();
        while text.len() <= paths::MAX_RELATIVE_PATH {
            text.push('/');
            text.push_str(&part);
        }
        text.push_str(&"x".repeat(extra));
        prop_assert_eq!(paths::safe_relative_path(&text), None);
    }
}
