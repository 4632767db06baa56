//! Runs one shell command the way ClusterRunner runs atoms: `bash -c 'set -o pipefail; …'` in its
//! own process group, stdout and stderr interleaved into one pipe, streamed as it is written.
//!
//! Cancel sends TERM to the whole process group and KILL after a grace period. When the command's
//! main process exits, anything it left running is killed too: an atom's processes never outlive
//! it (a background `sleep 100 &` would otherwise hold the output pipe open). Processes that left
//! the group (`setsid`, double forks) are caught by the [`crate::reaper`] the command runs under,
//! when the process has one (the `ish` binary); without one only the process group is killed.
//!
//! A command gets exactly the environment in its [`CommandSpec`], nothing of the slave's own:
//! the slave's process holds the cluster secret (`ISH_SECRET`) and its settings, and a job that
//! could read them could register a rogue slave. [`inherited_env`] picks the documented
//! allow-list of the slave's variables that commands do get.
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest piece of output read at once (and so the largest console message).
pub const CHUNK: usize = 64 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// Shell script (bash syntax).
    pub script: String,
    /// Working directory.
    pub cwd: PathBuf,
    /// The whole environment of the command (later entries win): the slave's own variables are
    /// not inherited, see [`inherited_env`].
    pub env: Vec<(String, String)>,
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    /// Exit code; `-N` when killed by signal N.
    pub exit_code: i32,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// True when it was stopped by a cancel.
    pub canceled: bool,
}

/// Variables of the slave's own environment that every command inherits, besides `LC_*`.
pub const INHERITED_VARS: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
];

/// Why a `pass_env` name is refused.
pub fn check_pass_env(name: &str) -> Result<(), String> {
    if name.starts_with("ISH_") {
        Err(format!(
            "pass_env may not name {name:?}: ISH_* variables are the slave's own settings and secret"
        ))
    } else if name.is_empty() || name.contains('=') || name.contains('\0') {
        Err(format!("pass_env holds an invalid variable name {name:?}"))
    } else {
        Ok(())
    }
}

/// The slave's variables that commands inherit: [`INHERITED_VARS`], `LC_*` and the names in
/// `extra` (the slave's `pass_env` setting), as they are in the slave's environment now.
/// `ISH_*` variables are never passed, whatever `extra` says.
pub fn inherited_env(extra: &[String]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| {
            !k.starts_with("ISH_")
                && (INHERITED_VARS.contains(&k.as_str())
                    || k.starts_with("LC_")
                    || extra.iter().any(|e| e == k))
        })
        .collect();
    env.sort();
    env
}

fn shell() -> (&'static str, bool) {
    if std::path::Path::new("/bin/bash").exists() {
        ("/bin/bash", true)
    } else {
        ("/bin/sh", false)
    }
}

/// Kills the process group when dropped before [`GroupGuard::disarm`]: if the task running an
/// atom is aborted (the slave is going down hard), the atom's processes go with it.
struct GroupGuard(i32);

impl GroupGuard {
    fn disarm(mut self) {
        self.0 = 0;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.0 > 0 {
            signal_group(self.0, Signal::SIGKILL);
        }
    }
}

fn signal_group(pgid: i32, sig: Signal) {
    // ESRCH (group already gone) is the normal case after the leader exited.
    let _ = killpg(Pid::from_raw(pgid), sig);
}

/// Runs `spec`, sending its output to `output` as it arrives (dropping output if nobody
/// listens). Returns when the command and its process group are gone.
pub async fn run(
    spec: CommandSpec,
    output: Option<mpsc::Sender<Vec<u8>>>,
    cancel: CancellationToken,
    grace: Duration,
) -> std::io::Result<Outcome> {
    let (mut reader, writer) = std::io::pipe()?;
    let (sh, pipefail) = shell();
    let script = if pipefail {
        format!("set -o pipefail; {}", spec.script)
    } else {
        spec.script.clone()
    };
    let reaper = crate::reaper::helper();
    let mut cmd = match reaper {
        Some(exe) => {
            let mut c = tokio::process::Command::new(exe);
            c.arg(crate::reaper::ARG)
                .arg(grace.as_millis().to_string())
                .arg(sh)
                // Closing it stops the command; so does the slave's death.
                .stdin(Stdio::piped())
                // Killing the reaper would orphan what it guards: it is stopped through stdin.
                .kill_on_drop(false);
            c
        }
        None => {
            let mut c = tokio::process::Command::new(sh);
            c.stdin(Stdio::null()).kill_on_drop(true);
            c
        }
    };
    cmd.arg("-c")
        .arg(script)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    // Our copies of the pipe's write end must be closed, or the reader never sees EOF.
    drop(cmd);
    // Dropped with this future at the latest: the reaper then stops the command's tree.
    let mut stop = child.stdin.take();
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    // With a reaper its group holds only the reaper: the command's tree is the reaper's to stop.
    let guard = GroupGuard(if reaper.is_some() { 0 } else { pgid });
    // Shared so that it can be taken from a pump still blocked in `read`: the receiver's end of
    // the output must come even if a process that escaped keeps the pipe open (no reaper).
    let output = std::sync::Arc::new(std::sync::Mutex::new(output));
    let pump_output = output.clone();
    let pump = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let tx = pump_output.lock().expect("poisoned").clone();
                    if let Some(tx) = tx {
                        // A closed receiver just means nobody wants the output any more.
                        let _ = tx.blocking_send(buf[..n].to_vec());
                    }
                }
            }
        }
    });
    let mut canceled = false;
    let status = tokio::select! {
        s = child.wait() => s?,
        _ = cancel.cancelled() => {
            canceled = true;
            // The reaper sends TERM, and KILL after the grace; past that (it is stuck) it is
            // killed itself, the last resort.
            let wait = if stop.take().is_some() {
                grace + Duration::from_secs(5)
            } else {
                signal_group(pgid, Signal::SIGTERM);
                grace
            };
            match tokio::time::timeout(wait, child.wait()).await {
                Ok(s) => s?,
                Err(_) => {
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await?
                }
            }
        }
    };
    drop(stop);
    let seconds = started.elapsed().as_secs_f64();
    if pgid > 0 {
        signal_group(pgid, Signal::SIGKILL);
    }
    guard.disarm();
    // A process that left the group (setsid) could keep the pipe open when there is no reaper:
    // don't wait forever, and end the output for whoever reads it.
    let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
    output.lock().expect("poisoned").take();
    use std::os::unix::process::ExitStatusExt;
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|s| -s))
        .unwrap_or(-1);
    Ok(Outcome {
        exit_code,
        seconds,
        canceled,
    })
}

/// A future the worker can hold across tasks (boxed so that the seams below stay object safe).
pub type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

/// What runs a build's commands (atomizers, setup, atoms, teardown): the seam between the
/// worker's logic and processes, so that the worker is unit tested with a scripted fake.
pub trait CommandRunner: Send + Sync + std::fmt::Debug {
    /// Runs `spec` like [`run`]: output to `output` as it arrives, stopped by `cancel` (TERM,
    /// then KILL after `grace`); resolves when the command and everything it started are gone.
    fn run(
        &self,
        spec: CommandSpec,
        output: Option<mpsc::Sender<Vec<u8>>>,
        cancel: CancellationToken,
        grace: Duration,
    ) -> BoxFuture<std::io::Result<Outcome>>;
}

/// The real runner: `bash -o pipefail` in its own process group under the reaper ([`run`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Processes;

impl CommandRunner for Processes {
    fn run(
        &self,
        spec: CommandSpec,
        output: Option<mpsc::Sender<Vec<u8>>>,
        cancel: CancellationToken,
        grace: Duration,
    ) -> BoxFuture<std::io::Result<Outcome>> {
        Box::pin(run(spec, output, cancel, grace))
    }
}

/// Runs `spec` and returns its outcome with the last `keep` bytes of its output (for error
/// messages of setup, teardown and atomizers).
pub async fn run_capture(
    spec: CommandSpec,
    cancel: CancellationToken,
    grace: Duration,
    keep: usize,
) -> std::io::Result<(Outcome, Vec<u8>)> {
    capture_with(&Processes, spec, cancel, grace, keep).await
}

/// [`run_capture`] with `runner`.
pub fn capture_with(
    runner: &dyn CommandRunner,
    spec: CommandSpec,
    cancel: CancellationToken,
    grace: Duration,
    keep: usize,
) -> BoxFuture<std::io::Result<(Outcome, Vec<u8>)>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let run = runner.run(spec, Some(tx), cancel, grace);
    Box::pin(async move {
        let collect = tokio::spawn(async move {
            let mut out = Vec::new();
            while let Some(chunk) = rx.recv().await {
                out.extend_from_slice(&chunk);
                if out.len() > keep.saturating_mul(2).max(CHUNK) {
                    out.drain(..out.len() - keep);
                }
            }
            if out.len() > keep {
                out.drain(..out.len() - keep);
            }
            out
        });
        let outcome = run.await?;
        let out = collect.await.unwrap_or_default();
        Ok((outcome, out))
    })
}

/// Runs `spec` and returns its whole output, refusing to keep more than `limit` bytes (atomizers:
/// their output IS the atom list, so it must not be cut).
pub async fn run_collect(
    spec: CommandSpec,
    cancel: CancellationToken,
    grace: Duration,
    limit: usize,
) -> std::io::Result<(Outcome, Result<Vec<u8>, usize>)> {
    collect_with(&Processes, spec, cancel, grace, limit).await
}

/// An atomizer's outcome and whole output, or the output's size when it was over the limit.
pub type Collected = (Outcome, Result<Vec<u8>, usize>);

/// [`run_collect`] with `runner`.
pub fn collect_with(
    runner: &dyn CommandRunner,
    spec: CommandSpec,
    cancel: CancellationToken,
    grace: Duration,
    limit: usize,
) -> BoxFuture<std::io::Result<Collected>> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let run = runner.run(spec, Some(tx), cancel, grace);
    Box::pin(async move {
        let collect = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut total = 0usize;
            while let Some(chunk) = rx.recv().await {
                total += chunk.len();
                if total <= limit {
                    out.extend_from_slice(&chunk);
                }
            }
            if total > limit { Err(total) } else { Ok(out) }
        });
        let outcome = run.await?;
        let out = collect.await.unwrap_or(Err(0));
        Ok((outcome, out))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(script: &str) -> CommandSpec {
        CommandSpec {
            script: script.into(),
            cwd: std::env::temp_dir(),
            env: vec![("ISH_TEST_VAR".into(), "hello".into())],
        }
    }

    /// Dead, or a zombie waiting for an init that does not reap (containers).
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn output_is_interleaved_and_env_is_set() {
        let (o, out) = run_capture(
            spec("echo out-$ISH_TEST_VAR; echo err >&2; echo out2"),
            CancellationToken::new(),
            Duration::from_secs(1),
            1024,
        )
        .await
        .unwrap();
        assert_eq!(o.exit_code, 0);
        assert_eq!(String::from_utf8(out).unwrap(), "out-hello\nerr\nout2\n");
    }

    #[tokio::test]
    async fn the_slaves_own_environment_is_not_inherited() {
        // The test process stands in for the slave: whatever it has that is not in the spec or
        // on the allow-list must not reach the command.
        assert!(std::env::var_os("PATH").is_some());
        let mut s = spec("env");
        s.env
            .extend(inherited_env(&["CARGO".into(), "ISH_NOPE".into()]));
        let (o, out) = run_capture(s, CancellationToken::new(), Duration::from_secs(1), 1 << 20)
            .await
            .unwrap();
        assert_eq!(o.exit_code, 0);
        let out = String::from_utf8(out).unwrap();
        let mut names: Vec<&str> = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, _)| k)
            .collect();
        names.sort();
        for n in &names {
            let allowed = INHERITED_VARS.contains(n)
                || n.starts_with("LC_")
                || ["ISH_TEST_VAR", "CARGO", "PWD", "SHLVL", "_", "OLDPWD"].contains(n);
            assert!(allowed, "{n} reached the command: {names:?}");
        }
        assert!(names.contains(&"PATH"), "{names:?}");
        // Cargo sets CARGO for test processes: passed because it was asked for.
        assert!(names.contains(&"CARGO"), "{names:?}");
        assert!(!names.contains(&"CARGO_PKG_NAME"), "{names:?}");
        assert!(out.contains("ISH_TEST_VAR=hello\n"), "{out}");
    }

    #[test]
    fn pass_env_may_not_name_ish_variables() {
        assert!(check_pass_env("ISH_SECRET").is_err());
        assert!(check_pass_env("A=B").is_err());
        assert!(check_pass_env("JAVA_HOME").is_ok());
    }

    #[tokio::test]
    async fn pipefail_is_on() {
        let (o, _) = run_capture(
            spec("false | true"),
            CancellationToken::new(),
            Duration::from_secs(1),
            16,
        )
        .await
        .unwrap();
        assert_eq!(o.exit_code, 1);
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let (o, _) = run_capture(
            spec("exit 3"),
            CancellationToken::new(),
            Duration::from_secs(1),
            16,
        )
        .await
        .unwrap();
        assert_eq!(o.exit_code, 3);
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let task = tokio::spawn(run_capture(
            spec(&script),
            c2,
            Duration::from_millis(500),
            16,
        ));
        for _ in 0..100 {
            if pidfile.exists() && !std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let t0 = Instant::now();
        cancel.cancel();
        let (o, _) = task.await.unwrap().unwrap();
        assert!(o.canceled);
        assert!(
            o.exit_code < 0 || o.exit_code == 143,
            "exit {}",
            o.exit_code
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
        // The background sleep is gone too. A killed process can stay visible for a moment on a
        // loaded machine while the kernel tears it down; a survivor would sleep on for 30 s.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !gone(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone(pid), "child {pid} survived");
    }

    #[tokio::test]
    async fn leftover_background_processes_do_not_hang_the_atom() {
        let t0 = Instant::now();
        let (o, out) = run_capture(
            spec("sleep 30 & echo started"),
            CancellationToken::new(),
            Duration::from_secs(1),
            64,
        )
        .await
        .unwrap();
        assert_eq!(o.exit_code, 0);
        assert_eq!(out, b"started\n");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    /// Without a reaper a process that left the group can keep the output pipe open: the
    /// command still ends, and so does its output (the atom is not held until the process exits).
    #[tokio::test]
    async fn a_process_holding_the_pipe_does_not_hold_the_output_open() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & while [ ! -s {} ]; do sleep 0.01; done; echo out",
            pidfile.display(),
            pidfile.display()
        );
        let t0 = Instant::now();
        let (o, out) = tokio::time::timeout(
            Duration::from_secs(20),
            run_capture(
                spec(&script),
                CancellationToken::new(),
                Duration::from_secs(1),
                64,
            ),
        )
        .await
        .expect("the output ended")
        .unwrap();
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        assert_eq!(o.exit_code, 0);
        assert_eq!(out, b"out\n");
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn collect_refuses_oversized_output() {
        let (_, out) = run_collect(
            spec("seq 1 100000"),
            CancellationToken::new(),
            Duration::from_secs(1),
            1000,
        )
        .await
        .unwrap();
        assert!(out.is_err());
    }
}
