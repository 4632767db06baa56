//! Job configuration: `clusterrunner.yaml` and the build request's inline `config`
//! (spec §7.1, §7.3 item 4, §10.1–§10.3).
//!
//! Error texts reproduce ClusterRunner's (`app/master/job_config.py`,
//! `app/master/cluster_runner_config.py`) byte for byte, including the Python `repr`
//! renderings of types, lists and sets, because clients and functional tests match on the
//! build's `error_message`. Validation follows the original's order so that a config with
//! several problems reports the same one first.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::io;

use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, Visitor};

use crate::proto::{Atomizer, JobConfig};

/// Largest accepted config, in bytes of text (and, for YAML, also after alias expansion):
/// the config is read into memory on the master for every build, so it must not be able
/// to exhaust it.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Deepest accepted nesting of lists/mappings; a valid job needs only 4 levels, and the
/// limit keeps every recursive walk over the parsed value shallow.
pub const MAX_CONFIG_DEPTH: usize = 32;

const COMMANDS: &str = "commands";
const ATOMIZERS: &str = "atomizers";
const SETUP_BUILD: &str = "setup_build";
const TEARDOWN_BUILD: &str = "teardown_build";
const MAX_EXECUTORS: &str = "max_executors";
const MAX_EXECUTORS_PER_SLAVE: &str = "max_executors_per_slave";
// Ish CD extensions: retries of failing atoms, and time limits.
const RETRIES: &str = "retries";
const ATOM_TIMEOUT: &str = "atom_timeout";
const BUILD_TIMEOUT: &str = "build_timeout";
const DISPATCH: &str = "dispatch";

/// Most retries a job may ask for: retries hide failures, a large number hides them for long.
pub const MAX_RETRIES: u32 = 10;

/// Largest `atom_timeout` / `build_timeout`, in seconds: the most the build record can hold.
pub const MAX_TIMEOUT_SECONDS: u32 = u32::MAX;

/// Python renders a missing job name (inline config without `job_name`) as `None`.
const PY_NONE: &str = "None";

/// Why a job config was refused. The `Display` text is the build's `error_message`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobConfigError {
    /// The YAML document is not a mapping (this includes an empty file).
    #[error("The yaml config file could not be parsed to a dictionary")]
    NotADictionary,
    /// The YAML document is an empty mapping.
    #[error("No jobs found in the config.")]
    NoJobs,
    /// A job's definition is not a mapping (e.g. `Job:` with nothing under it).
    #[error("Passed in configuration is not a dictionary for job: \"{job}\".")]
    JobNotADictionary {
        /// Job name as Python's `str()` shows it (`None` for an unnamed inline config).
        job: String,
    },
    /// `commands` and/or `atomizers` are absent.
    #[error(
        "Definition for job \"{job}\" is missing required config sections: {}",
        py_set(missing)
    )]
    MissingSections {
        /// Job name.
        job: String,
        /// Missing section names, in the order `commands`, `atomizers`.
        missing: Vec<String>,
    },
    /// A section name that ClusterRunner does not know.
    #[error("Definition for job \"{job}\" contains an invalid config section \"{section}\".")]
    InvalidSection {
        /// Job name.
        job: String,
        /// The offending key.
        section: String,
    },
    /// A section value of the wrong type; `expected`/`found` are the Python renderings,
    /// e.g. `[(<class 'list'>, <class 'str'>)]` and `<class 'str'>`.
    #[error(
        "Definition for job \"{job}\" contains an invalid value for config section \"{section}\". \
         Parser expected one of {expected} but found {found}."
    )]
    InvalidValue {
        /// Job name.
        job: String,
        /// Section name.
        section: String,
        /// Python rendering of the accepted types.
        expected: String,
        /// Python rendering of the type found.
        found: String,
    },
    /// A list section is empty (the original crashed with `IndexError` here).
    #[error(
        "Definition for job \"{job}\" contains an empty list for config section \"{section}\"."
    )]
    EmptySection {
        /// Job name.
        job: String,
        /// Section name.
        section: String,
    },
    /// `dispatch` is not a known mode.
    #[error(
        "Definition for job \"{job}\" contains an invalid value for config section \"dispatch\". \
         Expected \"queue\" or \"clusterrunner\" but found \"{value}\"."
    )]
    BadDispatch {
        /// Job name.
        job: String,
        /// The value given.
        value: String,
    },
    /// `retries` outside 0..=MAX_RETRIES.
    #[error(
        "Definition for job \"{job}\" contains an invalid value for config section \"retries\". \
         Expected an integer from 0 to {MAX_RETRIES} but found {value}."
    )]
    BadRetries {
        /// Job name.
        job: String,
        /// The value given.
        value: i128,
    },
    /// `atom_timeout`/`build_timeout` over MAX_TIMEOUT_SECONDS (zero or negative is
    /// [`JobConfigError::NonPositiveMaxExecutors`], like the executor counts).
    #[error(
        "Definition for job \"{job}\" contains an invalid value for config section \"{section}\". \
         Expected a number of seconds from 1 to {MAX_TIMEOUT_SECONDS} but found {value}."
    )]
    BadTimeout {
        /// Job name.
        job: String,
        /// Section name.
        section: String,
        /// The value given.
        value: i128,
    },
    /// `max_executors`/`max_executors_per_slave`/a timeout is zero or negative.
    #[error(
        "Definition for job \"{job}\" contains an invalid value for config section \"{section}\". \
         Expected a positive integer but found {value}."
    )]
    NonPositiveMaxExecutors {
        /// Job name.
        job: String,
        /// Section name.
        section: String,
        /// The value given.
        value: i128,
    },
    /// An atomizer variable that could not be exported by a POSIX shell.
    #[error(
        "Definition for job \"{job}\" contains an invalid atomizer variable name \"{variable}\". \
         Atomizer variable names must be valid shell identifiers ([A-Za-z_][A-Za-z0-9_]*)."
    )]
    InvalidAtomizerVariable {
        /// Job name.
        job: String,
        /// The offending variable name.
        variable: String,
    },
    /// An atomizer whose command is not a string.
    #[error(
        "Definition for job \"{job}\" contains an invalid command for atomizer \"{variable}\". \
         Expected <class 'str'> but found {found}."
    )]
    InvalidAtomizerCommand {
        /// Job name.
        job: String,
        /// Atomizer variable.
        variable: String,
        /// Python rendering of the type found.
        found: String,
    },
    /// `job_name` does not name a job of the file.
    #[error(
        "The job \"{job}\" was not found in the loaded config. Valid jobs are: {}",
        py_list(valid)
    )]
    JobNotFound {
        /// The requested name.
        job: String,
        /// Job names of the file, in file order.
        valid: Vec<String>,
    },
    /// The file has several jobs and the request named none.
    #[error(
        "Multiple jobs are defined in this project but you did not specify one. \
         Specify one of the following job names: {}",
        py_list(valid)
    )]
    JobNotSpecified {
        /// Job names of the file, in file order.
        valid: Vec<String>,
    },
    /// The YAML text is malformed; carries the parser's message with line and column.
    #[error("The yaml config file could not be parsed: {0}")]
    Yaml(String),
    /// The inline config text is not valid JSON; carries the parser's message.
    #[error("The job config could not be parsed as JSON: {0}")]
    Json(String),
    /// Over [`MAX_CONFIG_BYTES`].
    #[error(
        "The job config is too large: it exceeds {MAX_CONFIG_BYTES} bytes \
         (YAML aliases count once per use)."
    )]
    TooLarge,
    /// Nested deeper than [`MAX_CONFIG_DEPTH`].
    #[error("The job config is nested too deeply: it exceeds {MAX_CONFIG_DEPTH} levels.")]
    TooDeep,
}

/// Parses a whole `clusterrunner.yaml`, validates every job in it (as ClusterRunner does,
/// so one broken job breaks all builds of the project) and selects one: `job_name` if
/// given (an empty name is a name, not "unspecified"), else the only job.
pub fn parse_project_yaml(text: &str, job_name: Option<&str>) -> Result<JobConfig, JobConfigError> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(JobConfigError::TooLarge);
    }
    let ctx = Ctx::new(true);
    let parsed = NodeSeed::root(&ctx).deserialize(serde_norway::Deserializer::from_str(text));
    let root = ctx.finish(parsed, |e| JobConfigError::Yaml(e.to_string()))?;

    let Node::Map(jobs) = root else {
        return Err(JobConfigError::NotADictionary);
    };
    let mut configs = Vec::with_capacity(jobs.len());
    for (key, sections) in &jobs {
        let name = key.py_str();
        let mut config = validate_job(&name, sections)?;
        config.name.clone_from(&name);
        configs.push(config);
    }
    if configs.is_empty() {
        return Err(JobConfigError::NoJobs);
    }
    let names = || configs.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    match job_name {
        Some(wanted) => match configs.iter().position(|c| c.name == wanted) {
            Some(i) => Ok(configs.swap_remove(i)),
            None => Err(JobConfigError::JobNotFound {
                job: wanted.to_owned(),
                valid: names(),
            }),
        },
        None if configs.len() == 1 => Ok(configs.swap_remove(0)),
        None => Err(JobConfigError::JobNotSpecified { valid: names() }),
    }
}

/// Validates the build request's inline `config` (one job's sections). The result is named
/// `job_name` (empty if absent). A JSON `null` is refused here: callers must treat it as
/// "no inline config" and read `clusterrunner.yaml` instead, as ClusterRunner does.
///
/// `serde_json` (without `preserve_order`) sorts object keys, so with several problems the
/// one reported first may differ from ClusterRunner; [`parse_inline_config_str`] keeps the
/// request's key order.
pub fn parse_inline_config(
    config: &serde_json::Value,
    job_name: Option<&str>,
) -> Result<JobConfig, JobConfigError> {
    let ctx = Ctx::new(false);
    let parsed = NodeSeed::root(&ctx).deserialize(config);
    let node = ctx.finish(parsed, |e| JobConfigError::Json(e.to_string()))?;
    // Only now is the value known to be shallow enough to serialize without deep recursion.
    let mut counter = ByteCounter(0);
    if serde_json::to_writer(&mut counter, config).is_err() {
        return Err(JobConfigError::TooLarge);
    }
    inline_job(&node, job_name)
}

/// [`parse_inline_config`] from JSON text, keeping the text's key order.
pub fn parse_inline_config_str(
    json: &str,
    job_name: Option<&str>,
) -> Result<JobConfig, JobConfigError> {
    if json.len() > MAX_CONFIG_BYTES {
        return Err(JobConfigError::TooLarge);
    }
    let ctx = Ctx::new(false);
    let mut de = serde_json::Deserializer::from_str(json);
    let parsed = NodeSeed::root(&ctx)
        .deserialize(&mut de)
        .and_then(|node| de.end().map(|()| node));
    let node = ctx.finish(parsed, |e| JobConfigError::Json(e.to_string()))?;
    inline_job(&node, job_name)
}

/// Joins a command list into one shell string exactly like ClusterRunner's
/// `_shell_command_list_to_single_command` (spec §10.1), quirks included (e.g. the double
/// space left by `cmd ;`), because the joined string is part of timing-data identity and of
/// what users see in logs.
pub fn join_commands(commands: &[Option<&str>]) -> String {
    let mut joined = String::new();
    for command in commands.iter().flatten() {
        let stripped = py_strip(command).trim_end_matches(';');
        joined.push_str(stripped);
        // A `;` or `&&` after a backgrounding `&` is a shell syntax error.
        joined.push_str(if py_strip(stripped).ends_with('&') {
            " "
        } else {
            " && "
        });
    }
    let joined = py_strip(&joined);
    if joined.ends_with("&&") {
        py_strip(joined.trim_end_matches('&')).to_owned()
    } else {
        joined.to_owned()
    }
}

/// Turns one atomizer's combined output into atom command strings (spec §10.3), like
/// ClusterRunner: the output is stripped and split into lines; blank lines *inside* the
/// output are kept (they become `export VAR="";`), as the original does. The build's
/// project directory is replaced by `$PROJECT_DIR` so that atoms, which key the timing
/// data, are the same for every build of the project. The value is not shell-escaped,
/// as in the original.
pub fn atoms_from_output(variable: &str, output: &str, project_dir: &str) -> Vec<String> {
    py_splitlines(py_strip(output))
        .into_iter()
        .map(|line| {
            let value = if project_dir.is_empty() {
                line.to_owned()
            } else {
                line.replace(project_dir, "$PROJECT_DIR")
            };
            format!("export {variable}=\"{value}\";")
        })
        .collect()
}

/// The shell command an executor runs for one atom (the `clusterrunner_command` artifact
/// content without its trailing newline): the atom's `export` prefix, then the job commands.
pub fn atom_command(atom_command_string: &str, job_commands: &str) -> String {
    format!("{atom_command_string} {job_commands}")
}

// ---------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------

fn inline_job(node: &Node, job_name: Option<&str>) -> Result<JobConfig, JobConfigError> {
    let mut config = validate_job(job_name.unwrap_or(PY_NONE), node)?;
    config.name = job_name.unwrap_or_default().to_owned();
    Ok(config)
}

/// What a section must hold, with the Python rendering ClusterRunner's message uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expected {
    ListOfStr,
    ListOfDict,
    Int,
    Str,
}

impl Expected {
    fn of(section: &str) -> Option<Self> {
        match section {
            COMMANDS | SETUP_BUILD | TEARDOWN_BUILD => Some(Self::ListOfStr),
            ATOMIZERS => Some(Self::ListOfDict),
            MAX_EXECUTORS | MAX_EXECUTORS_PER_SLAVE | RETRIES | ATOM_TIMEOUT | BUILD_TIMEOUT => {
                Some(Self::Int)
            }
            DISPATCH => Some(Self::Str),
            _ => None,
        }
    }

    fn py(self) -> &'static str {
        match self {
            Self::ListOfStr => "[(<class 'list'>, <class 'str'>)]",
            Self::ListOfDict => "[(<class 'list'>, <class 'dict'>)]",
            Self::Int => "[<class 'int'>]",
            Self::Str => "[<class 'str'>]",
        }
    }
}

/// Validates one job's sections in ClusterRunner's order (not-a-dict, missing required,
/// then each section in key order) and builds the config (unnamed).
fn validate_job(job: &str, sections: &Node) -> Result<JobConfig, JobConfigError> {
    let Node::Map(sections) = sections else {
        return Err(JobConfigError::JobNotADictionary {
            job: job.to_owned(),
        });
    };
    let has = |name: &str| sections.iter().any(|(k, _)| k.as_str() == Some(name));
    let missing: Vec<String> = [COMMANDS, ATOMIZERS]
        .into_iter()
        .filter(|name| !has(name))
        .map(str::to_owned)
        .collect();
    if !missing.is_empty() {
        return Err(JobConfigError::MissingSections {
            job: job.to_owned(),
            missing,
        });
    }

    let mut config = JobConfig::default();
    for (key, value) in sections {
        let invalid_section = || JobConfigError::InvalidSection {
            job: job.to_owned(),
            section: key.py_str(),
        };
        let section = key.as_str().ok_or_else(invalid_section)?;
        let expected = Expected::of(section).ok_or_else(invalid_section)?;
        let invalid_value = |found: String| JobConfigError::InvalidValue {
            job: job.to_owned(),
            section: section.to_owned(),
            expected: expected.py().to_owned(),
            found,
        };
        match (expected, value) {
            (Expected::Int, Node::Int(n)) if section == RETRIES => {
                if !(0..=i128::from(MAX_RETRIES)).contains(n) {
                    return Err(JobConfigError::BadRetries {
                        job: job.to_owned(),
                        value: *n,
                    });
                }
                config.retries = *n as u32;
            }
            (Expected::Int, Node::Int(n))
                if section == ATOM_TIMEOUT || section == BUILD_TIMEOUT =>
            {
                if *n <= 0 {
                    return Err(JobConfigError::NonPositiveMaxExecutors {
                        job: job.to_owned(),
                        section: section.to_owned(),
                        value: *n,
                    });
                }
                // Refused rather than clamped: a limit other than the one written would end
                // (or fail to end) atoms and builds at a time nobody asked for.
                // The conversion is the range check (MAX_TIMEOUT_SECONDS is u32::MAX).
                const _: () = assert!(MAX_TIMEOUT_SECONDS == u32::MAX);
                let seconds = u32::try_from(*n).map_err(|_| JobConfigError::BadTimeout {
                    job: job.to_owned(),
                    section: section.to_owned(),
                    value: *n,
                })?;
                if section == ATOM_TIMEOUT {
                    config.atom_timeout_seconds = seconds;
                } else {
                    config.build_timeout_seconds = seconds;
                }
            }
            (Expected::Int, Node::Int(n)) => {
                if *n <= 0 {
                    return Err(JobConfigError::NonPositiveMaxExecutors {
                        job: job.to_owned(),
                        section: section.to_owned(),
                        value: *n,
                    });
                }
                // Beyond u32 is as good as the original's sys.maxsize default: unlimited.
                let n = u32::try_from(*n).unwrap_or(u32::MAX);
                if section == MAX_EXECUTORS {
                    config.max_executors = n;
                } else {
                    config.max_executors_per_slave = n;
                }
            }
            (Expected::Int, other) => return Err(invalid_value(other.py_type())),
            (Expected::Str, Node::Str(mode)) => {
                config.dispatch = match mode.as_str() {
                    "queue" => crate::proto::DispatchMode::Queue,
                    "clusterrunner" => crate::proto::DispatchMode::Clusterrunner,
                    _ => {
                        return Err(JobConfigError::BadDispatch {
                            job: job.to_owned(),
                            value: mode.clone(),
                        });
                    }
                } as i32;
            }
            (Expected::Str, other) => return Err(invalid_value(other.py_type())),
            (_, Node::Seq(items)) => {
                let Some(first) = items.first() else {
                    return Err(JobConfigError::EmptySection {
                        job: job.to_owned(),
                        section: section.to_owned(),
                    });
                };
                // The original type-checks only the first item (later ones crashed or were
                // skipped at run time); we check every item with the same message.
                let wanted = if expected == Expected::ListOfStr {
                    "str"
                } else {
                    "dict"
                };
                if first.py_name() != wanted {
                    return Err(invalid_value(first.py_list_type()));
                }
                if expected == Expected::ListOfStr {
                    let mut commands = Vec::with_capacity(items.len());
                    for item in items {
                        match item {
                            Node::Str(s) => commands.push(Some(s.as_str())),
                            // Skipped, like the original (`- ` lines and YAML comments).
                            Node::Null => commands.push(None),
                            other => return Err(invalid_value(other.py_list_type())),
                        }
                    }
                    let joined = join_commands(&commands);
                    match section {
                        COMMANDS => config.commands = joined,
                        SETUP_BUILD => config.setup_build = joined,
                        _ => config.teardown_build = joined,
                    }
                } else {
                    config.atomizers = atomizers(job, items, invalid_value)?;
                }
            }
            (_, other) => return Err(invalid_value(other.py_type())),
        }
    }
    Ok(config)
}

/// Flattens the atomizer list. A mapping with several entries yields several atomizers in
/// order, as the original iterated every item of every dict.
fn atomizers(
    job: &str,
    items: &[Node],
    invalid_value: impl Fn(String) -> JobConfigError,
) -> Result<Vec<Atomizer>, JobConfigError> {
    let mut out = Vec::new();
    for item in items {
        let Node::Map(entries) = item else {
            return Err(invalid_value(item.py_list_type()));
        };
        for (key, command) in entries {
            let variable = key.py_str();
            if key.as_str().is_none() || !is_shell_identifier(&variable) {
                return Err(JobConfigError::InvalidAtomizerVariable {
                    job: job.to_owned(),
                    variable,
                });
            }
            let Node::Str(command) = command else {
                return Err(JobConfigError::InvalidAtomizerCommand {
                    job: job.to_owned(),
                    variable,
                    found: command.py_type(),
                });
            };
            out.push(Atomizer {
                variable,
                command: command.clone(),
            });
        }
    }
    Ok(out)
}

fn is_shell_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

// ---------------------------------------------------------------------------------------
// Parsed value with Python's data model
// ---------------------------------------------------------------------------------------

/// The parsed config as Python would see it: mappings keep first-insertion order and the
/// last value of a duplicated key (PyYAML / `json.loads` semantics).
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Python class name of the value.
    fn py_name(&self) -> &'static str {
        match self {
            Self::Null => "NoneType",
            Self::Bool(_) => "bool",
            Self::Int(_) => "int",
            Self::Float(_) => "float",
            Self::Str(_) => "str",
            Self::Seq(_) => "list",
            Self::Map(_) => "dict",
        }
    }

    /// `str(type(value))`.
    fn py_type(&self) -> String {
        format!("<class '{}'>", self.py_name())
    }

    /// The original's rendering of a list section whose item is `self`.
    fn py_list_type(&self) -> String {
        format!("(<class 'list'>, <class '{}'>)", self.py_name())
    }

    /// `str(value)` for scalars, which is how Python formats job and section names.
    fn py_str(&self) -> String {
        match self {
            Self::Null => PY_NONE.to_owned(),
            Self::Bool(true) => "True".to_owned(),
            Self::Bool(false) => "False".to_owned(),
            Self::Int(n) => n.to_string(),
            Self::Float(f) => py_float(*f),
            Self::Str(s) => s.clone(),
            Self::Seq(_) | Self::Map(_) => format!("<{}>", self.py_name()),
        }
    }

    /// Dictionary identity; `None` for unhashable keys. Python treats `1`, `1.0` and `True`
    /// as the same key.
    fn key_id(&self) -> Option<String> {
        Some(match self {
            Self::Null => "n".to_owned(),
            Self::Bool(b) => format!("i{}", i32::from(*b)),
            Self::Int(n) => format!("i{n}"),
            Self::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 => {
                // Integral and in range (checked above), so the cast is exact.
                let n = *f as i128;
                format!("i{n}")
            }
            Self::Float(f) => format!("f{}", f.to_bits()),
            Self::Str(s) => format!("s{s}"),
            Self::Seq(_) | Self::Map(_) => return None,
        })
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Seq(_) => "sequence",
            Self::Map(_) => "mapping",
            _ => "scalar",
        }
    }
}

fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let s = format!("{f:?}");
    match s.split_once('e') {
        Some((mantissa, exp)) if !exp.starts_with('-') => format!("{mantissa}e+{exp}"),
        _ => s,
    }
}

/// Applies YAML merge keys (`<<`) the way PyYAML's `flatten_mapping` does: merged entries
/// come first (for a list of mappings, later ones first), so the mapping's own keys win,
/// then earlier merge sources.
fn flatten_merge(pairs: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, String> {
    if !pairs.iter().any(|(k, _)| k.as_str() == Some("<<")) {
        return Ok(pairs);
    }
    let mut merged = Vec::new();
    let mut own = Vec::with_capacity(pairs.len());
    for (key, value) in pairs {
        if key.as_str() != Some("<<") {
            own.push((key, value));
            continue;
        }
        match value {
            Node::Map(entries) => merged.extend(entries),
            Node::Seq(items) => {
                let mut sources = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Node::Map(entries) => sources.push(entries),
                        other => {
                            return Err(format!(
                                "expected a mapping for merging, but found {}",
                                other.kind()
                            ));
                        }
                    }
                }
                for entries in sources.into_iter().rev() {
                    merged.extend(entries);
                }
            }
            other => {
                return Err(format!(
                    "expected a mapping or list of mappings for merging, but found {}",
                    other.kind()
                ));
            }
        }
    }
    merged.extend(own);
    Ok(merged)
}

/// Builds a dict from pairs with Python semantics: first position, last value.
fn build_dict(pairs: Vec<(Node, Node)>) -> Result<Vec<(Node, Node)>, String> {
    let mut out: Vec<(Node, Node)> = Vec::with_capacity(pairs.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        let id = key
            .key_id()
            .ok_or_else(|| "found unhashable key".to_owned())?;
        match index.get(&id) {
            Some(&i) => out[i].1 = value,
            None => {
                index.insert(id, out.len());
                out.push((key, value));
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Bounded deserialization (shared by YAML, JSON text and serde_json::Value)
// ---------------------------------------------------------------------------------------

/// State shared by all seeds of one parse. Limits are enforced while the value is built, so
/// an alias bomb is stopped before it allocates, and the exact [`JobConfigError`] survives
/// the trip through the deserializer's own error type.
#[derive(Debug)]
struct Ctx {
    yaml: bool,
    budget: Cell<usize>,
    failure: RefCell<Option<JobConfigError>>,
}

impl Ctx {
    fn new(yaml: bool) -> Self {
        Self {
            yaml,
            budget: Cell::new(MAX_CONFIG_BYTES),
            failure: RefCell::new(None),
        }
    }

    fn fail<E: de::Error>(&self, error: JobConfigError) -> E {
        let e = E::custom(&error);
        *self.failure.borrow_mut() = Some(error);
        e
    }

    /// Each node costs one byte plus its text, roughly what it takes in the source; so
    /// the budget only bites on alias expansion or on values that are too large anyway.
    fn charge<E: de::Error>(&self, bytes: usize) -> Result<(), E> {
        match self.budget.get().checked_sub(bytes.saturating_add(1)) {
            Some(rest) => {
                self.budget.set(rest);
                Ok(())
            }
            None => Err(self.fail(JobConfigError::TooLarge)),
        }
    }

    fn finish<E>(
        &self,
        parsed: Result<Node, E>,
        syntax: impl FnOnce(E) -> JobConfigError,
    ) -> Result<Node, JobConfigError> {
        parsed.map_err(|e| {
            self.failure
                .borrow_mut()
                .take()
                .unwrap_or_else(|| syntax(e))
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct NodeSeed<'a> {
    ctx: &'a Ctx,
    /// Containers enclosing the value being read.
    depth: usize,
}

impl<'a> NodeSeed<'a> {
    fn root(ctx: &'a Ctx) -> Self {
        Self { ctx, depth: 0 }
    }

    fn enter<E: de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_CONFIG_DEPTH {
            return Err(self.ctx.fail(JobConfigError::TooDeep));
        }
        self.ctx.charge(0)?;
        Ok(Self {
            ctx: self.ctx,
            depth: self.depth + 1,
        })
    }

    fn scalar<E: de::Error>(self, node: Node) -> Result<Node, E> {
        let len = match &node {
            Node::Str(s) => s.len(),
            _ => 0,
        };
        self.ctx.charge(len)?;
        Ok(node)
    }
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML/JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        self.scalar(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        self.scalar(Node::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        self.scalar(Node::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        self.scalar(Node::Int(i128::from(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        self.scalar(Node::Int(i128::from(v)))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        self.scalar(Node::Int(v))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        self.scalar(Node::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        self.scalar(Node::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        self.scalar(Node::Str(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        self.scalar(Node::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let child = self.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(child)? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let child = self.enter()?;
        let mut pairs = Vec::new();
        while let Some(key) = map.next_key_seed(child)? {
            let value = map.next_value_seed(child)?;
            pairs.push((key, value));
        }
        if self.ctx.yaml {
            pairs = flatten_merge(pairs).map_err(de::Error::custom)?;
        }
        build_dict(pairs).map(Node::Map).map_err(de::Error::custom)
    }

    /// serde_norway reports values with a local tag (`!foo bar`) as enums; PyYAML's safe
    /// loader refuses them, so do we.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Node, A::Error> {
        let (tag, _) = data.variant::<String>()?;
        Err(de::Error::custom(format!(
            "could not determine a constructor for the tag '!{tag}'"
        )))
    }
}

/// Measures serialized size, giving up as soon as the limit is passed.
#[derive(Debug)]
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        if self.0 > MAX_CONFIG_BYTES {
            return Err(io::Error::other("job config too large"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Python string semantics
// ---------------------------------------------------------------------------------------

/// `str.isspace()`: Rust's whitespace plus the ASCII information separators.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `str.strip()`.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// `str.splitlines()`: splits on every Unicode line boundary; `\r\n` counts once.
fn py_splitlines(s: &str) -> Vec<&str> {
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
fn py_printable(c: char) -> bool {
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
fn py_repr(s: &str) -> String {
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
fn py_list(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| py_repr(s)).collect();
    format!("[{}]", inner.join(", "))
}

/// `repr(set_of_str)`; an empty set would be `set()`, which never occurs here.
fn py_set(items: &[String]) -> String {
    if items.is_empty() {
        return "set()".to_owned();
    }
    let inner: Vec<String> = items.iter().map(|s| py_repr(s)).collect();
    format!("{{{}}}", inner.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn yaml_err(text: &str) -> String {
        match parse_project_yaml(text, None) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn job(body: &str) -> String {
        format!("Job:\n{body}")
    }

    const COMPLETE_VALID_CONFIG: &str = r#"
    Best Job Ever:
        max_executors: 21
        setup_build:
            - echo "This is setup! Woo!"  # no semicolons in this section
            - sleep 1
        commands:
            - echo "Now I'm doing $THE_THING!";  # semicolons in this section
            - echo "Semicolons are fun." > /tmp/my_hard_work.txt;
        atomizers:
            - THE_THING: printf 'something with a number %d\\n' {1..50}
    "#;

    const MULTI_JOB_CONFIG: &str = r#"
    First Job:
        commands:
            - echo "go"
        atomizers:
            - ENV_VAR: echo "atom"
    Second Job:
        commands:
            - echo "go"
        atomizers:
            - ENV_VAR: echo "atom"
    "#;

    // ---- join_commands (spec §10.1 vectors) ----

    #[test]
    fn join_vector_plain() {
        assert_eq!(
            join_commands(&[Some(r#"echo "This is setup! Woo!""#), Some("sleep 1")]),
            r#"echo "This is setup! Woo!" && sleep 1"#
        );
    }

    #[test]
    fn join_vector_semicolons() {
        assert_eq!(
            join_commands(&[
                Some(r#"echo "Now I'm doing $THE_THING!";"#),
                Some(r#"echo "Semicolons are fun." > /tmp/my_hard_work.txt;"#),
            ]),
            r#"echo "Now I'm doing $THE_THING!" && echo "Semicolons are fun." > /tmp/my_hard_work.txt"#
        );
    }

    #[test]
    fn join_vector_nulls_skipped() {
        assert_eq!(
            join_commands(&[
                Some(r#"echo "first""#),
                None,
                None,
                None,
                Some(r#"echo "last""#)
            ]),
            r#"echo "first" && echo "last""#
        );
    }

    #[test]
    fn join_vector_background_two_spaces() {
        assert_eq!(
            join_commands(&[
                Some(r#"echo "in the background" &"#),
                Some(r#"echo "in the foreground" ;"#),
                Some(r#"echo "another thing""#),
            ]),
            r#"echo "in the background" & echo "in the foreground"  && echo "another thing""#
        );
    }

    #[test]
    fn join_edge_cases() {
        assert_eq!(join_commands(&[]), "");
        assert_eq!(join_commands(&[None]), "");
        assert_eq!(join_commands(&[Some("a;;;")]), "a");
        assert_eq!(join_commands(&[Some("sleep 1 &")]), "sleep 1 &");
        assert_eq!(join_commands(&[Some("a &&")]), "a");
        assert_eq!(join_commands(&[Some("  a  "), Some("\tb\n")]), "a && b");
    }

    // ---- YAML: valid configs ----

    #[test]
    fn complete_valid_config() {
        let c = parse_project_yaml(COMPLETE_VALID_CONFIG, None).unwrap();
        assert_eq!(c.name, "Best Job Ever");
        assert_eq!(c.max_executors, 21);
        assert_eq!(c.max_executors_per_slave, 0);
        assert_eq!(c.setup_build, r#"echo "This is setup! Woo!" && sleep 1"#);
        assert_eq!(c.teardown_build, "");
        assert_eq!(
            c.commands,
            r#"echo "Now I'm doing $THE_THING!" && echo "Semicolons are fun." > /tmp/my_hard_work.txt"#
        );
        assert_eq!(
            c.atomizers,
            vec![Atomizer {
                variable: "THE_THING".into(),
                command: r"printf 'something with a number %d\\n' {1..50}".into(),
            }]
        );
    }

    #[test]
    fn valid_config_with_empty_commands() {
        let text = r#"
    PHPUnit:
        commands:
            - echo "first"
            -
            - # some YAML comment
            -
            - echo "last"
        atomizers:
            - ENV_VAR: echo "atom"
    "#;
        let c = parse_project_yaml(text, None).unwrap();
        assert_eq!(c.commands, r#"echo "first" && echo "last""#);
        assert_eq!(c.atomizers.len(), 1);
        assert_eq!(c.atomizers[0].variable, "ENV_VAR");
        assert_eq!(c.atomizers[0].command, r#"echo "atom""#);
    }

    #[test]
    fn background_task_config() {
        let text = r#"
    PHPUnit:
        max_executors: 5
        setup_build:
            - echo "in the background" &
            - echo "in the foreground" ;
            - echo "another thing"
        atomizers:
            - VARNAME: sleep1
        commands:
            - echo "go"
    "#;
        let c = parse_project_yaml(text, None).unwrap();
        assert_eq!(
            c.setup_build,
            r#"echo "in the background" & echo "in the foreground"  && echo "another thing""#
        );
        assert_eq!(c.max_executors, 5);
    }

    #[test]
    fn all_sections() {
        let text = job(concat!(
            "  commands: ['shell command 1', 'shell command 2;']\n",
            "  atomizers: [{TESTPATH: atomizer command}]\n",
            "  setup_build: ['setup command 1;', 'setup command 2;']\n",
            "  teardown_build: ['teardown command 1;', 'teardown command 2;']\n",
            "  max_executors: 100\n",
            "  max_executors_per_slave: 2\n",
        ));
        let c = parse_project_yaml(&text, Some("Job")).unwrap();
        assert_eq!(c.commands, "shell command 1 && shell command 2");
        assert_eq!(c.setup_build, "setup command 1 && setup command 2");
        assert_eq!(c.teardown_build, "teardown command 1 && teardown command 2");
        assert_eq!(c.max_executors, 100);
        assert_eq!(c.max_executors_per_slave, 2);
    }

    #[test]
    fn multi_key_atomizer_mappings_are_flattened_in_order() {
        let text = job("  commands: [x]\n  atomizers:\n    - {A: a, B: b}\n    - C: c\n");
        let c = parse_project_yaml(&text, None).unwrap();
        let vars: Vec<_> = c.atomizers.iter().map(|a| a.variable.as_str()).collect();
        assert_eq!(vars, ["A", "B", "C"]);
    }

    #[test]
    fn huge_max_executors_saturates() {
        let text =
            job("  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: 9223372036854775807\n");
        assert_eq!(
            parse_project_yaml(&text, None).unwrap().max_executors,
            u32::MAX
        );
    }

    #[test]
    fn duplicate_keys_last_value_wins() {
        let text = job("  commands: [first]\n  atomizers: [{A: a}]\n  commands: [second]\n");
        assert_eq!(parse_project_yaml(&text, None).unwrap().commands, "second");
    }

    #[test]
    fn yaml_merge_keys_and_aliases() {
        let text = r#"
base: &base
  commands: [echo base]
  atomizers: [{A: ls}]
Other:
  <<: *base
  commands: [echo other]
"#;
        let c = parse_project_yaml(text, Some("Other")).unwrap();
        assert_eq!(c.name, "Other");
        assert_eq!(c.commands, "echo other");
        assert_eq!(c.atomizers[0].command, "ls");

        let text = concat!(
            "a: &a {commands: [one], atomizers: [{A: x}], max_executors: 3}\n",
            "b: &b {commands: [two], atomizers: [{B: y}]}\n",
            "c:\n  <<: [*b, *a]\n",
        );
        let c = parse_project_yaml(text, Some("c")).unwrap();
        // The earlier merge source wins; keys only in a later one still come through.
        assert_eq!(c.commands, "two");
        assert_eq!(c.atomizers[0].variable, "B");
        assert_eq!(c.max_executors, 3);

        let e = yaml_err("a:\n  <<: 3\n");
        assert!(
            e.contains("expected a mapping or list of mappings for merging"),
            "{e}"
        );
    }

    // ---- YAML: selection ----

    #[test]
    fn multi_job_selection() {
        assert_eq!(
            parse_project_yaml(MULTI_JOB_CONFIG, Some("Second Job"))
                .unwrap()
                .name,
            "Second Job"
        );
        assert_eq!(
            parse_project_yaml(MULTI_JOB_CONFIG, Some("First Job"))
                .unwrap()
                .name,
            "First Job"
        );
        assert_eq!(
            yaml_err(MULTI_JOB_CONFIG),
            "Multiple jobs are defined in this project but you did not specify one. \
             Specify one of the following job names: ['First Job', 'Second Job']"
        );
        assert_eq!(
            parse_project_yaml(MULTI_JOB_CONFIG, Some("Nope"))
                .unwrap_err()
                .to_string(),
            "The job \"Nope\" was not found in the loaded config. Valid jobs are: ['First Job', 'Second Job']"
        );
        assert_eq!(
            parse_project_yaml(MULTI_JOB_CONFIG, Some("Nope")).unwrap_err(),
            JobConfigError::JobNotFound {
                job: "Nope".into(),
                valid: vec!["First Job".into(), "Second Job".into()],
            }
        );
    }

    #[test]
    fn single_job_selected_by_default_and_by_name() {
        let text = job("  commands: [x]\n  atomizers: [{A: a}]\n");
        assert_eq!(parse_project_yaml(&text, None).unwrap().name, "Job");
        assert_eq!(parse_project_yaml(&text, Some("Job")).unwrap().name, "Job");
        assert_eq!(
            parse_project_yaml(&text, Some("")).unwrap_err().to_string(),
            "The job \"\" was not found in the loaded config. Valid jobs are: ['Job']"
        );
    }

    #[test]
    fn every_job_is_validated_even_if_another_is_requested() {
        let text = format!("{MULTI_JOB_CONFIG}\n    Broken:\n        commands: [x]\n");
        assert_eq!(
            parse_project_yaml(&text, Some("First Job"))
                .unwrap_err()
                .to_string(),
            "Definition for job \"Broken\" is missing required config sections: {'atomizers'}"
        );
    }

    #[test]
    fn job_names_are_rendered_like_python_repr() {
        let text = "\"it's\": {commands: [x], atomizers: [{A: a}]}\n'b\\c': {commands: [x], atomizers: [{A: a}]}\n";
        assert_eq!(
            yaml_err(text),
            "Multiple jobs are defined in this project but you did not specify one. \
             Specify one of the following job names: [\"it's\", 'b\\\\c']"
        );
    }

    // ---- YAML: document-level errors ----

    #[test]
    fn not_a_dictionary() {
        for text in [
            "",
            "# only a comment\n",
            "- a\n- b\n",
            "just a string",
            "42",
        ] {
            assert_eq!(
                yaml_err(text),
                "The yaml config file could not be parsed to a dictionary",
                "{text:?}"
            );
        }
    }

    #[test]
    fn no_jobs() {
        assert_eq!(yaml_err("{}"), "No jobs found in the config.");
        assert_eq!(
            parse_project_yaml("{}", None).unwrap_err(),
            JobConfigError::NoJobs
        );
    }

    #[test]
    fn yaml_syntax_error_has_position() {
        let e = parse_project_yaml("Job:\n  commands: [x\n  atomizers: y\n", None).unwrap_err();
        let JobConfigError::Yaml(msg) = &e else {
            panic!("{e:?}")
        };
        assert!(msg.contains("line"), "{msg}");
        assert!(
            e.to_string()
                .starts_with("The yaml config file could not be parsed: ")
        );
    }

    #[test]
    fn custom_tags_are_refused() {
        let e = yaml_err("Job: !foo {commands: [x]}\n");
        assert!(
            e.contains("could not determine a constructor for the tag '!foo'"),
            "{e}"
        );
    }

    #[test]
    fn unhashable_key_is_refused() {
        let e = yaml_err("? [a, b]\n: c\n");
        assert!(e.contains("found unhashable key"), "{e}");
    }

    // ---- per-job validation errors ----

    #[test]
    fn empty_job_is_not_a_dictionary() {
        assert_eq!(
            yaml_err("\n    PHPUnit:\n    "),
            "Passed in configuration is not a dictionary for job: \"PHPUnit\"."
        );
        assert_eq!(
            yaml_err("Job: [a]\n"),
            "Passed in configuration is not a dictionary for job: \"Job\"."
        );
    }

    #[test]
    fn missing_required_sections() {
        assert_eq!(
            yaml_err(&job("  max_executors: 5\n")),
            "Definition for job \"Job\" is missing required config sections: {'commands', 'atomizers'}"
        );
        assert_eq!(
            yaml_err(&job("  atomizers: [{TESTPATH: atomizer command}]\n")),
            "Definition for job \"Job\" is missing required config sections: {'commands'}"
        );
        let no_command = r#"
    PHPUnit:
        max_executors: 5
        setup_build:
            - echo "I don't know what I'm doing."
        atomizers:
            - VARNAME: sleep 123
    "#;
        assert_eq!(
            yaml_err(no_command),
            "Definition for job \"PHPUnit\" is missing required config sections: {'commands'}"
        );
    }

    #[test]
    fn missing_is_reported_before_invalid_section() {
        assert_eq!(
            yaml_err(&job("  bogus: 1\n  commands: [x]\n")),
            "Definition for job \"Job\" is missing required config sections: {'atomizers'}"
        );
    }

    #[test]
    fn invalid_section() {
        assert_eq!(
            yaml_err(&job(
                "  commands: [x]\n  timing_file: t.json\n  atomizers: [{A: a}]\n"
            )),
            "Definition for job \"Job\" contains an invalid config section \"timing_file\"."
        );
        assert_eq!(
            yaml_err(&job("  commands: [x]\n  atomizers: [{A: a}]\n  1: x\n")),
            "Definition for job \"Job\" contains an invalid config section \"1\"."
        );
    }

    #[test]
    fn sections_are_checked_in_key_order() {
        assert_eq!(
            yaml_err(&job("  commands: x\n  atomizers: [{A: a}]\n  bogus: 1\n")),
            "Definition for job \"Job\" contains an invalid value for config section \"commands\". \
             Parser expected one of [(<class 'list'>, <class 'str'>)] but found <class 'str'>."
        );
    }

    #[test]
    fn invalid_values() {
        let cases = [
            // A bare string instead of a list is refused, as in the original.
            (
                "  commands: echo hi\n  atomizers: [{A: a}]\n",
                "commands",
                "[(<class 'list'>, <class 'str'>)]",
                "<class 'str'>",
            ),
            (
                "  commands:\n    -\n  atomizers: [{A: a}]\n",
                "commands",
                "[(<class 'list'>, <class 'str'>)]",
                "(<class 'list'>, <class 'NoneType'>)",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}]\n  setup_build:\n",
                "setup_build",
                "[(<class 'list'>, <class 'str'>)]",
                "<class 'NoneType'>",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}]\n  teardown_build: [1]\n",
                "teardown_build",
                "[(<class 'list'>, <class 'str'>)]",
                "(<class 'list'>, <class 'int'>)",
            ),
            (
                "  commands: [x]\n  atomizers:\n    - \"export VARNAME='asdf'\"\n",
                "atomizers",
                "[(<class 'list'>, <class 'dict'>)]",
                "(<class 'list'>, <class 'str'>)",
            ),
            (
                "  commands: [x]\n  atomizers: {A: a}\n",
                "atomizers",
                "[(<class 'list'>, <class 'dict'>)]",
                "<class 'dict'>",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: '5'\n",
                "max_executors",
                "[<class 'int'>]",
                "<class 'str'>",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors_per_slave: 2.5\n",
                "max_executors_per_slave",
                "[<class 'int'>]",
                "<class 'float'>",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: true\n",
                "max_executors",
                "[<class 'int'>]",
                "<class 'bool'>",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}]\n  max_executors: [1]\n",
                "max_executors",
                "[<class 'int'>]",
                "<class 'list'>",
            ),
            // Items after the first are checked too (our addition, same message).
            (
                "  commands: [x, [y]]\n  atomizers: [{A: a}]\n",
                "commands",
                "[(<class 'list'>, <class 'str'>)]",
                "(<class 'list'>, <class 'list'>)",
            ),
            (
                "  commands: [x]\n  atomizers: [{A: a}, b]\n",
                "atomizers",
                "[(<class 'list'>, <class 'dict'>)]",
                "(<class 'list'>, <class 'str'>)",
            ),
        ];
        for (body, section, expected, found) in cases {
            assert_eq!(
                yaml_err(&job(body)),
                format!(
                    "Definition for job \"Job\" contains an invalid value for config section \"{section}\". \
                     Parser expected one of {expected} but found {found}."
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn empty_list_section() {
        assert_eq!(
            yaml_err(&job("  commands: []\n  atomizers: [{A: a}]\n")),
            "Definition for job \"Job\" contains an empty list for config section \"commands\"."
        );
        assert_eq!(
            yaml_err(&job(
                "  commands: [x]\n  atomizers: [{A: a}]\n  setup_build: []\n"
            )),
            "Definition for job \"Job\" contains an empty list for config section \"setup_build\"."
        );
    }

    #[test]
    fn non_positive_max_executors() {
        for (section, value) in [("max_executors", "0"), ("max_executors_per_slave", "-3")] {
            assert_eq!(
                yaml_err(&job(&format!(
                    "  commands: [x]\n  atomizers: [{{A: a}}]\n  {section}: {value}\n"
                ))),
                format!(
                    "Definition for job \"Job\" contains an invalid value for config section \"{section}\". \
                     Expected a positive integer but found {value}."
                )
            );
        }
    }

    #[test]
    fn invalid_atomizer_variable() {
        for var in ["1ABC", "MY-VAR", "'A B'", "''", "1"] {
            let e = parse_project_yaml(
                &job(&format!("  commands: [x]\n  atomizers: [{{{var}: ls}}]\n")),
                None,
            )
            .unwrap_err();
            assert!(
                matches!(e, JobConfigError::InvalidAtomizerVariable { .. }),
                "{var}: {e:?}"
            );
        }
        assert_eq!(
            yaml_err(&job("  commands: [x]\n  atomizers: [{MY-VAR: ls}]\n")),
            "Definition for job \"Job\" contains an invalid atomizer variable name \"MY-VAR\". \
             Atomizer variable names must be valid shell identifiers ([A-Za-z_][A-Za-z0-9_]*)."
        );
        assert!(
            parse_project_yaml(&job("  commands: [x]\n  atomizers: [{_ok_1: ls}]\n"), None).is_ok()
        );
    }

    #[test]
    fn invalid_atomizer_command() {
        assert_eq!(
            yaml_err(&job("  commands: [x]\n  atomizers: [{A: [ls]}]\n")),
            "Definition for job \"Job\" contains an invalid command for atomizer \"A\". \
             Expected <class 'str'> but found <class 'list'>."
        );
        assert_eq!(
            yaml_err(&job("  commands: [x]\n  atomizers: [{A: }]\n")),
            "Definition for job \"Job\" contains an invalid command for atomizer \"A\". \
             Expected <class 'str'> but found <class 'NoneType'>."
        );
    }

    // ---- limits ----

    #[test]
    fn yaml_too_large_text() {
        let text = format!(
            "Job:\n  commands: ['{}']\n  atomizers: [{{A: a}}]\n",
            "x".repeat(MAX_CONFIG_BYTES)
        );
        assert_eq!(
            parse_project_yaml(&text, None).unwrap_err(),
            JobConfigError::TooLarge
        );
        assert!(
            JobConfigError::TooLarge
                .to_string()
                .contains("1048576 bytes")
        );
    }

    #[test]
    fn yaml_alias_bomb_is_refused() {
        let mut text = String::from("a: &a [\"lolololololololololololololololol\"]\n");
        let mut prev = 'a';
        for name in "bcdefghijklm".chars() {
            let refs = vec![format!("*{prev}"); 10].join(",");
            text.push_str(&format!("{name}: &{name} [{refs}]\n"));
            prev = name;
        }
        assert!(text.len() < 2000);
        let e = parse_project_yaml(&text, None).unwrap_err();
        assert!(
            e == JobConfigError::TooLarge
                || matches!(&e, JobConfigError::Yaml(m) if m.contains("repetition limit")),
            "{e:?}"
        );
    }

    #[test]
    fn yaml_alias_expansion_over_the_size_limit_is_refused() {
        let refs = vec!["*big"; 20].join(", ");
        let text = format!(
            "Job:\n  commands: [&big '{}']\n  atomizers: [{{A: a}}]\n  setup_build: [{refs}]\n",
            "x".repeat(MAX_CONFIG_BYTES / 10)
        );
        assert!(text.len() < MAX_CONFIG_BYTES);
        assert_eq!(
            parse_project_yaml(&text, None).unwrap_err(),
            JobConfigError::TooLarge
        );
    }

    #[test]
    fn large_config_under_the_limit_is_accepted() {
        let mut text = String::from("Job:\n  atomizers: [{A: a}]\n  commands: [");
        while text.len() < MAX_CONFIG_BYTES - 10 {
            text.push_str("a,");
        }
        text.push_str("a]\n");
        assert!(parse_project_yaml(&text, None).is_ok());
    }

    #[test]
    fn yaml_depth_limit() {
        // Job mapping + sections mapping + list = 3 levels before the padding.
        let pad = |n: usize| format!("{}x{}", "[".repeat(n), "]".repeat(n));
        let ok = format!(
            "Job: {{commands: [x], atomizers: [{{A: a}}], bogus: {}}}\n",
            pad(MAX_CONFIG_DEPTH - 2)
        );
        assert!(matches!(
            parse_project_yaml(&ok, None).unwrap_err(),
            JobConfigError::InvalidSection { .. }
        ));
        let deep = format!(
            "Job: {{commands: [x], atomizers: [{{A: a}}], bogus: {}}}\n",
            pad(MAX_CONFIG_DEPTH - 1)
        );
        assert_eq!(
            parse_project_yaml(&deep, None).unwrap_err(),
            JobConfigError::TooDeep
        );
        let very_deep = format!("Job: {}\n", pad(10_000));
        assert_eq!(
            parse_project_yaml(&very_deep, None).unwrap_err(),
            JobConfigError::TooDeep
        );
        assert!(JobConfigError::TooDeep.to_string().contains("32 levels"));
    }

    #[test]
    fn json_limits() {
        let big = json!({"commands": ["x".repeat(MAX_CONFIG_BYTES)], "atomizers": [{"A": "a"}]});
        assert_eq!(
            parse_inline_config(&big, None).unwrap_err(),
            JobConfigError::TooLarge
        );
        let big_text = big.to_string();
        assert_eq!(
            parse_inline_config_str(&big_text, None).unwrap_err(),
            JobConfigError::TooLarge
        );

        let mut deep = json!("x");
        for _ in 0..MAX_CONFIG_DEPTH {
            deep = json!([deep]);
        }
        let cfg = json!({"commands": ["x"], "atomizers": [{"A": "a"}], "zzz": deep});
        assert_eq!(
            parse_inline_config(&cfg, None).unwrap_err(),
            JobConfigError::TooDeep
        );
        assert_eq!(
            parse_inline_config_str(&cfg.to_string(), None).unwrap_err(),
            JobConfigError::TooDeep
        );

        // A value far deeper than any parser would produce is still refused without
        // recursing all the way down.
        let mut deeper = json!("x");
        for _ in 0..300 {
            deeper = json!([deeper]);
        }
        assert_eq!(
            parse_inline_config(&deeper, None).unwrap_err(),
            JobConfigError::TooDeep
        );
    }

    // ---- inline config ----

    #[test]
    fn inline_config_valid() {
        let cfg = json!({
            "commands": ["echo $TOKEN;"],
            "atomizers": [{"TOKEN": "seq 3"}],
            "setup_build": ["make", null, "make install"],
            "max_executors_per_slave": 1,
        });
        let c = parse_inline_config(&cfg, Some("Inline")).unwrap();
        assert_eq!(c.name, "Inline");
        assert_eq!(c.commands, "echo $TOKEN");
        assert_eq!(c.setup_build, "make && make install");
        assert_eq!(c.max_executors_per_slave, 1);
        assert_eq!(c.max_executors, 0);
        assert_eq!(
            c.atomizers,
            vec![Atomizer {
                variable: "TOKEN".into(),
                command: "seq 3".into()
            }]
        );

        let unnamed = parse_inline_config(&cfg, None).unwrap();
        assert_eq!(unnamed.name, "");
        assert_eq!(
            parse_inline_config_str(&cfg.to_string(), Some("Inline")).unwrap(),
            c
        );
    }

    #[test]
    fn inline_config_errors() {
        assert_eq!(
            parse_inline_config(&json!("commands: [x]"), None)
                .unwrap_err()
                .to_string(),
            "Passed in configuration is not a dictionary for job: \"None\"."
        );
        assert_eq!(
            parse_inline_config(&json!([1]), Some("J"))
                .unwrap_err()
                .to_string(),
            "Passed in configuration is not a dictionary for job: \"J\"."
        );
        assert_eq!(
            parse_inline_config(&json!({"atomizers": [{"A": "a"}]}), None)
                .unwrap_err()
                .to_string(),
            "Definition for job \"None\" is missing required config sections: {'commands'}"
        );
        assert_eq!(
            parse_inline_config(
                &json!({"commands": ["x"], "atomizers": [{"A": "a"}], "nope": 1}),
                Some("J")
            )
            .unwrap_err()
            .to_string(),
            "Definition for job \"J\" contains an invalid config section \"nope\"."
        );
        assert_eq!(
            parse_inline_config(
                &json!({"commands": ["x"], "atomizers": [{"A": "a"}], "max_executors": 1.0}),
                None
            )
            .unwrap_err()
            .to_string(),
            "Definition for job \"None\" contains an invalid value for config section \"max_executors\". \
             Parser expected one of [<class 'int'>] but found <class 'float'>."
        );
        // JSON has no merge keys.
        assert_eq!(
            parse_inline_config(
                &json!({"commands": ["x"], "atomizers": [{"A": "a"}], "<<": {}}),
                None
            )
            .unwrap_err()
            .to_string(),
            "Definition for job \"None\" contains an invalid config section \"<<\"."
        );
    }

    #[test]
    fn inline_config_str_keeps_key_order_and_reports_syntax() {
        // With the text's order, "zzz" is reported before the bad "commands" value.
        let text = r#"{"zzz": 1, "commands": "x", "atomizers": [{"A": "a"}]}"#;
        assert_eq!(
            parse_inline_config_str(text, None).unwrap_err().to_string(),
            "Definition for job \"None\" contains an invalid config section \"zzz\"."
        );
        let e = parse_inline_config_str(r#"{"commands": ["x"],"#, None).unwrap_err();
        assert!(
            matches!(&e, JobConfigError::Json(m) if m.contains("line 1")),
            "{e:?}"
        );
        let e = parse_inline_config_str(
            r#"{"commands": ["x"], "atomizers": [{"A": "a"}]} trailing"#,
            None,
        )
        .unwrap_err();
        assert!(matches!(e, JobConfigError::Json(_)), "{e:?}");
    }

    // ---- atoms ----

    #[test]
    fn atoms_replace_project_dir() {
        let output = "/tmp/test/directory/test_a.py\n/tmp/test/directory/test_b.py\n/tmp/test/directory/test_c.py\n";
        assert_eq!(
            atoms_from_output("TEST_FILE", output, "/tmp/test/directory"),
            vec![
                r#"export TEST_FILE="$PROJECT_DIR/test_a.py";"#,
                r#"export TEST_FILE="$PROJECT_DIR/test_b.py";"#,
                r#"export TEST_FILE="$PROJECT_DIR/test_c.py";"#,
            ]
        );
        assert_eq!(
            atoms_from_output("V", "/p/x /p/y", "/p"),
            vec![r#"export V="$PROJECT_DIR/x $PROJECT_DIR/y";"#]
        );
        assert_eq!(
            atoms_from_output("V", "/p/x", ""),
            vec![r#"export V="/p/x";"#]
        );
    }

    #[test]
    fn atoms_strip_and_split_like_python() {
        assert!(atoms_from_output("V", "", "/p").is_empty());
        assert!(atoms_from_output("V", " \n\t\n ", "/p").is_empty());
        // Interior blank lines are kept, as in the original.
        assert_eq!(
            atoms_from_output("V", "\n\n a\r\n\r\n b \n", "/p"),
            vec![r#"export V="a";"#, r#"export V="";"#, r#"export V=" b";"#]
        );
        assert_eq!(
            atoms_from_output("V", "a\rb\u{2028}c", ""),
            vec![r#"export V="a";"#, r#"export V="b";"#, r#"export V="c";"#]
        );
    }

    #[test]
    fn atom_command_joins_with_space() {
        assert_eq!(
            atom_command(r#"export TOKEN="a";"#, "echo $TOKEN && true"),
            r#"export TOKEN="a"; echo $TOKEN && true"#
        );
    }

    // ---- Python rendering helpers ----

    #[test]
    fn python_reprs() {
        assert_eq!(py_repr("abc"), "'abc'");
        assert_eq!(py_repr("it's"), "\"it's\"");
        assert_eq!(py_repr("'\""), "'\\'\"'");
        assert_eq!(py_repr("a\nb\t\u{1}\u{85}"), "'a\\nb\\t\\x01\\x85'");
        assert_eq!(py_repr("é"), "'é'");
        assert_eq!(py_list(&[]), "[]");
        assert_eq!(py_set(&["a".into(), "b".into()]), "{'a', 'b'}");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(1e20), "1e+20");
        assert_eq!(py_splitlines("a\n"), vec!["a"]);
        assert_eq!(py_strip("\u{1c} a \u{a0}"), "a");
    }
}

#[cfg(test)]
mod extension_tests {
    use super::*;

    #[test]
    fn retries_and_timeouts_are_read() {
        let c = parse_project_yaml(
            "J:\n  commands: [x]\n  atomizers: [{A: a}]\n  retries: 2\n  atom_timeout: 30\n  build_timeout: 600\n",
            None,
        )
        .unwrap();
        assert_eq!(
            (c.retries, c.atom_timeout_seconds, c.build_timeout_seconds),
            (2, 30, 600)
        );
        let c = parse_project_yaml(
            "J:\n  commands: [x]\n  atomizers: [{A: a}]\n  atom_timeout: 4294967295\n  build_timeout: 1\n",
            None,
        )
        .unwrap();
        assert_eq!(
            (c.atom_timeout_seconds, c.build_timeout_seconds),
            (MAX_TIMEOUT_SECONDS, 1)
        );
        let c = parse_project_yaml(
            "J:\n  commands: [x]\n  atomizers: [{A: a}]\n  retries: 0\n",
            None,
        )
        .unwrap();
        assert_eq!(c.retries, 0);
    }

    #[test]
    fn bad_retries_and_timeouts_are_refused() {
        for (section, value, needle) in [
            (
                "retries",
                "-1",
                "Expected an integer from 0 to 10 but found -1.",
            ),
            (
                "retries",
                "11",
                "Expected an integer from 0 to 10 but found 11.",
            ),
            (
                "atom_timeout",
                "0",
                "Expected a positive integer but found 0.",
            ),
            (
                "build_timeout",
                "-5",
                "Expected a positive integer but found -5.",
            ),
            // One past the range used to be clamped to it silently.
            (
                "atom_timeout",
                "4294967296",
                "Expected a number of seconds from 1 to 4294967295 but found 4294967296.",
            ),
            (
                "build_timeout",
                "99999999999999999999",
                "Expected a number of seconds from 1 to 4294967295 but found 99999999999999999999.",
            ),
            (
                "atom_timeout",
                "'10s'",
                "Parser expected one of [<class 'int'>] but found <class 'str'>",
            ),
        ] {
            let yaml =
                format!("J:\n  commands: [x]\n  atomizers: [{{A: a}}]\n  {section}: {value}\n");
            let e = parse_project_yaml(&yaml, None).unwrap_err().to_string();
            assert!(e.contains(&format!("config section \"{section}\"")), "{e}");
            assert!(e.contains(needle), "{e} should contain {needle}");
        }
    }
}

#[cfg(test)]
mod dispatch_tests {
    use super::*;

    #[test]
    fn dispatch_mode_is_read_and_checked() {
        let base = "J:\n  commands: [x]\n  atomizers: [{A: a}]\n";
        let c = parse_project_yaml(base, None).unwrap();
        assert_eq!(c.dispatch, crate::proto::DispatchMode::Queue as i32);
        let c = parse_project_yaml(&format!("{base}  dispatch: clusterrunner\n"), None).unwrap();
        assert_eq!(c.dispatch, crate::proto::DispatchMode::Clusterrunner as i32);
        let e = parse_project_yaml(&format!("{base}  dispatch: fastest\n"), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("Expected \"queue\" or \"clusterrunner\" but found \"fastest\""),
            "{e}"
        );
        let e = parse_project_yaml(&format!("{base}  dispatch: [queue]\n"), None).unwrap_err();
        assert!(
            e.to_string()
                .contains("invalid value for config section \"dispatch\""),
            "{e}"
        );
    }
}
