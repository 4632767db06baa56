//! The reaper every command runs under, so that none of its processes outlives it.
//!
//! Killing a command's process group is not enough: a process that calls `setsid` (or
//! `setpgid`) leaves the group, and after a double fork it is not even a descendant of the
//! command's shell any more (its parent died, it was reparented to init). So each command runs
//! under a small reaper: the slave's own binary, executed again with [`ARG`]. The reaper marks
//! itself a *child subreaper* (`prctl(PR_SET_CHILD_SUBREAPER)`), so the kernel reparents every
//! orphan of the command's tree to it instead of to init, whatever sessions or groups they moved
//! to. When the shell exits, the reaper kills everything below it (walking `/proc/*/stat` parent
//! links down from itself), reaps it all and exits with the shell's status.
//!
//! Why this and not the alternatives:
//! - a cgroup per command is exact too, but needs a delegated, writable cgroup v2 tree, which
//!   slaves in containers (and this project's own test machines) often do not have;
//! - making the slave itself the subreaper would send the orphans of *all* its commands to the
//!   one slave process, where an orphan whose parent died before the slave looked could no
//!   longer be told apart: the slave could only guess which command's daemon it is. A reaper per
//!   command gets exactly its own command's orphans, by the kernel's bookkeeping, and reaps them
//!   itself (no zombies in the slave, no `waitpid(-1)` racing tokio's own child reaping);
//! - no new system library and no `unsafe`: `prctl`, `kill` and `waitpid` come through `nix`.
//!
//! The reaper's stdin is a pipe from the slave, nothing else holds its write end. The slave
//! closes it to stop the command (cancel, timeout, shutdown); it is also closed when the slave
//! dies, even by SIGKILL. Then the reaper sends TERM to the command's tree, and KILL after the
//! grace period it was started with.
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// First argument that makes the slave's binary act as a reaper.
pub const ARG: &str = "__ish-command-reaper";

/// The executable commands run under, when this process can provide one.
static HELPER: OnceLock<PathBuf> = OnceLock::new();

/// Name of the small binary that is only a reaper, looked for next to the running one.
pub const SMALL_HELPER: &str = "ish-reaper";

/// Call first in `main` of a binary that runs slaves. Started as a reaper (by the slave's
/// runner), it runs the command and exits; otherwise it records what the commands of this
/// process's slaves run under: [`SMALL_HELPER`] when it is installed beside this binary (it
/// starts faster: every command pays for that start), else this binary itself.
pub fn main_if_reaper() {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(OsStr::new(ARG)) {
        std::process::exit(reaper_main(args.collect()));
    }
    let small = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(SMALL_HELPER)))
        .filter(|p| p.is_file());
    // Else the running binary itself, even if its file was replaced or deleted since it started.
    let _ = HELPER.set(small.unwrap_or_else(|| PathBuf::from("/proc/self/exe")));
}

/// Uses `exe` (a binary that calls [`main_if_reaper`] first) as the reaper, for slaves embedded
/// in another program. False if one was already set.
pub fn set_helper(exe: PathBuf) -> bool {
    HELPER.set(exe).is_ok()
}

/// The reaper to run commands under; `None` when the process has none (a slave embedded in a
/// program that did not call [`main_if_reaper`]): commands then only lose their process group.
pub fn helper() -> Option<&'static Path> {
    HELPER.get().map(PathBuf::as_path)
}

/// `<grace ms> <program> <args…>`: runs the program as described in the module docs; returns
/// the exit code when the program did not die of a signal.
fn reaper_main(args: Vec<OsString>) -> i32 {
    let me = std::process::id() as i32;
    let (Some(grace), Some(program)) = (args.first(), args.get(1)) else {
        eprintln!("[ish] reaper: usage: {ARG} <grace ms> <program> [args]");
        return 127;
    };
    let grace = Duration::from_millis(grace.to_str().and_then(|s| s.parse().ok()).unwrap_or(0));
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        // Still run it: the process group is killed all the same.
        eprintln!(
            "[ish] reaper: cannot become a child subreaper ({e}); only the command's process group will be stopped"
        );
    }
    use std::os::unix::process::CommandExt;
    let shell = match std::process::Command::new(program)
        .args(&args[2..])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c.id() as i32,
        Err(e) => {
            eprintln!(
                "[ish] reaper: cannot start {}: {e}",
                program.to_string_lossy()
            );
            return 127;
        }
    };
    std::thread::spawn(move || {
        use std::io::Read;
        // Ends on EOF: the slave stopped the command, or died.
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        let _ = killpg(Pid::from_raw(shell), Signal::SIGTERM);
        signal_tree(me, Signal::SIGTERM);
        std::thread::sleep(grace);
        signal_tree(me, Signal::SIGKILL);
    });
    // We are the only one waiting here: every child is either the shell or an adopted orphan.
    let status = loop {
        match waitpid(None, None) {
            Ok(s @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _)))
                if pid.as_raw() == shell =>
            {
                break s;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                eprintln!("[ish] reaper: waiting for the command: {e}");
                break WaitStatus::Exited(Pid::from_raw(shell), 127);
            }
        }
    };
    kill_tree(me);
    match status {
        WaitStatus::Signaled(_, sig, _) => {
            // Die the same way, so the slave records the signal; without a core file (the
            // command's own crash already left its own).
            let _ = nix::sys::prctl::set_dumpable(false);
            let _ = kill(Pid::from_raw(me), sig);
            // A signal whose default action is not to terminate (or that Rust ignores, SIGPIPE).
            128 + sig as i32
        }
        WaitStatus::Exited(_, code) => code,
        _ => 127,
    }
}

/// Parent of every live process, from `/proc/*/stat` (zombies left out: they are dead).
fn parents() -> HashMap<i32, i32> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        if let (Some(state), Some(ppid)) = (state, fields.next().and_then(|p| p.parse().ok()))
            && state != "Z"
            && state != "X"
        {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Live processes below `root`.
pub fn descendants(root: i32) -> Vec<i32> {
    let parents = parents();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, &ppid) in &parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

/// Sends `sig` to every live process below `root`; returns how many there were.
fn signal_tree(root: i32, sig: Signal) -> usize {
    let below = descendants(root);
    for &p in &below {
        let _ = kill(Pid::from_raw(p), sig);
    }
    below.len()
}

/// Kills everything below `root` (the reaper: orphans come to it) and reaps it, until nothing
/// is left. Bounded: a process stuck in the kernel (uninterruptible sleep) is given up on after
/// a while rather than holding the atom forever.
fn kill_tree(root: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    // Every process below us has an ancestor among our children (orphans are reparented to us),
    // so with no child left there is nothing to look for: the usual case costs no /proc scan.
    let reap = || loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    };
    while reap() {
        signal_tree(root, Signal::SIGKILL);
        if Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_follow_parent_links_down() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let sh = child.id() as i32;
        let me = std::process::id() as i32;
        // Wait for the shell's own child: other tests' processes are below `me` too, so a count
        // of everything below it says nothing about this shell.
        let deadline = Instant::now() + Duration::from_secs(5);
        let sleep = loop {
            let sleep = descendants(sh);
            if !sleep.is_empty() || Instant::now() > deadline {
                break sleep;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(sleep.len(), 1, "{sleep:?}");
        let below = descendants(me);
        assert!(below.contains(&sh), "{below:?}");
        assert!(below.contains(&sleep[0]), "{below:?}");
        let _ = kill(Pid::from_raw(sleep[0]), Signal::SIGKILL);
        child.wait().unwrap();
        assert!(descendants(sh).is_empty());
    }
}
