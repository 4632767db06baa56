//! Job configuration: `clusterrunner.yaml` and the build request's inline `config`
//! (spec §7.1, §7.3 item 4, §10.1–§10.3).
//!
//! Error texts reproduce ClusterRunner's (`app/master/job_config.py`,
//! `app/master/cluster_runner_config.py`) byte for byte, including the Python `repr`
//! renderings of types, lists and sets, because clients and functional tests match on the
//! build's `error_message`. Validation follows the original's order so that a config with
//! several problems reports the same one first.

use serde::de::DeserializeSeed;

use crate::proto::{Atomizer, JobConfig};

#[cfg(test)]
mod dispatch_tests;
#[cfg(test)]
mod extension_tests;
mod node;
mod pytext;
#[cfg(test)]
mod tests;

use node::*;
use pytext::*;

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
pub(super) const PY_NONE: &str = "None";

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
