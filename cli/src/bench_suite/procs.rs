//! Role processes of the benchmarks: started from the `ish` binary, CPU ticks and peak RSS read
//! from /proc, stopped on drop.
use anyhow::{Context, bail};
use std::path::Path;
use std::time::{Duration, Instant};

/// A role started as its own process (for memory measurements); killed on drop.
pub(super) struct RoleProcess(std::process::Child);

impl RoleProcess {
    pub(super) fn spawn(args: &[&str], secret: &str, log: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let out = std::fs::File::create(log)?;
        // ISH_BENCH_WRAPPER (e.g. "heaptrack" or "perf record -g -o /tmp/p.data") runs each
        // role process under a profiler; the RSS figures are then the wrapper's.
        let wrapper = std::env::var("ISH_BENCH_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(w) => {
                let mut c = std::process::Command::new(w);
                c.args(words).arg(exe);
                c
            }
            None => std::process::Command::new(exe),
        };
        let child = cmd
            .args(args)
            .env("ISH_SECRET", secret)
            .env("ISH_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        Ok(Self(child))
    }

    /// Peak resident memory so far, in MiB (VmHWM).
    pub(super) fn peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.0.id())
    }

    /// Waits until the process uses under 5% of a CPU over half a second (or `limit` passes).
    pub(super) async fn wait_idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = cpu_ticks(self.0.id());
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = cpu_ticks(self.0.id());
            // Clock ticks are 1/100 s: 2 ticks in 0.5 s is 4% of one CPU.
            if now.saturating_sub(last) <= 2 {
                return;
            }
            last = now;
        }
    }
}

/// User + system CPU time of a process, in clock ticks (`/proc/<pid>/stat` fields 14 and 15).
pub(super) fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3, so fields 14 and 15 are at 11 and 12.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Starts a master process on a free port; returns it and its gRPC URL.
pub(super) async fn master_process(
    dir: &Path,
    secret: &str,
    conf: &str,
) -> anyhow::Result<(RoleProcess, String)> {
    let data = dir.join("master");
    let conf_path = dir.join("master.toml");
    std::fs::write(&conf_path, conf)?;
    let p = RoleProcess::spawn(
        &[
            "master",
            "--config",
            conf_path.to_str().context("path")?,
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().context("path")?,
        ],
        secret,
        &dir.join("master.log"),
    )?;
    let addr_file = data.join(ish_master::ADDR_FILE);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !addr_file.exists() {
        if Instant::now() > deadline {
            bail!("the master did not start");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("http://{}", std::fs::read_to_string(addr_file)?.trim());
    Ok((p, url))
}
