//! Real `ish` processes for the multi-process tests: a master and slaves on 127.0.0.1, each
//! killed (SIGKILL) when the test did not stop it.

use ish_core::proto;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ISH: &str = env!("CARGO_BIN_EXE_ish");

/// A child process that is killed (SIGKILL) if the test did not stop it.
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str], secret: &str, logs: &Path) -> Self {
        let mut cmd = Command::new(ISH);
        cmd.args(args);
        Self::start(name, cmd, secret, logs)
    }

    /// Like [`Proc::spawn`], under an open-file limit of `nofile` (`ulimit -n` in the shell the
    /// binary is exec'd from).
    pub fn spawn_with_file_limit(
        name: &str,
        nofile: u32,
        args: &[&str],
        secret: &str,
        logs: &Path,
    ) -> Self {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
            ISH,
        ])
        .args(args);
        Self::start(name, cmd, secret, logs)
    }

    /// Starts `cmd` with the secret and its output in `<logs>/<name>.log`.
    fn start(name: &str, mut cmd: Command, secret: &str, logs: &Path) -> Self {
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("ISH_SECRET", secret)
            .env("ISH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    /// Like [`Proc::spawn`], with `cwd` as the process's working directory.
    pub fn spawn_in(name: &str, args: &[&str], secret: &str, logs: &Path, cwd: &Path) -> Self {
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(ISH)
            .args(args)
            .current_dir(cwd)
            .env("ISH_SECRET", secret)
            .env("ISH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self {
            name: name.into(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `sig` and waits (bounded) for the exit code.
    pub fn signal_and_wait(&mut self, sig: Signal, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take().unwrap();
        kill(Pid::from_raw(child.id() as i32), sig).unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {timeout:?} after {sig:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "{} still running; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub secret: String,
    pub url: String,
    pub master: Proc,
    pub slaves: Vec<Proc>,
    pub restarts: u32,
}

impl Cluster {
    pub async fn start(slaves: usize, executors: u32) -> Self {
        Self::start_with(slaves, executors, "").await
    }

    /// A cluster whose master reads `master_toml` as its settings file.
    pub async fn start_with(slaves: usize, executors: u32, master_toml: &str) -> Self {
        Self::start_limited(slaves, executors, master_toml, None).await
    }

    /// A cluster whose master may open at most `nofile` files (`ulimit -n`, set by the shell
    /// it is exec'd from) and reads `master_toml`. A restarted master has no such limit.
    pub async fn start_with_file_limit(
        nofile: u32,
        master_toml: &str,
        slaves: usize,
        executors: u32,
    ) -> Self {
        Self::start_limited(slaves, executors, master_toml, Some(nofile)).await
    }

    async fn start_limited(
        slaves: usize,
        executors: u32,
        master_toml: &str,
        nofile: Option<u32>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = ish_core::auth::generate_secret();
        let master_dir = dir.path().join("master");
        let conf = dir.path().join("master.toml");
        std::fs::write(&conf, master_toml).unwrap();
        let args = [
            "master",
            "--config",
            conf.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            master_dir.to_str().unwrap(),
        ];
        let master = match nofile {
            None => Proc::spawn("master", &args, &secret, dir.path()),
            Some(n) => Proc::spawn_with_file_limit("master", n, &args, &secret, dir.path()),
        };
        let addr_file = master_dir.join("master.addr");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !addr_file.exists() {
            assert!(
                Instant::now() < deadline,
                "master did not start:\n{}",
                master.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let url = format!(
            "http://{}",
            std::fs::read_to_string(&addr_file).unwrap().trim()
        );
        let mut c = Self {
            dir,
            secret,
            url,
            master,
            slaves: Vec::new(),
            restarts: 0,
        };
        for i in 0..slaves {
            c.start_slave(i, executors);
        }
        c.wait_slaves(slaves).await;
        c
    }

    pub fn start_slave(&mut self, i: usize, executors: u32) {
        let p = self.spawn_slave(i, executors, &format!("slave-{i}"));
        self.slaves.push(p);
    }

    /// A slave process named `slave-<i>` (its log in `<log>.log`).
    pub fn spawn_slave(&self, i: usize, executors: u32, log: &str) -> Proc {
        let data = self.dir.path().join(format!("slave-{i}"));
        Proc::spawn(
            log,
            &[
                "slave",
                "--master",
                &self.url,
                "--executors",
                &executors.to_string(),
                "--data-dir",
                data.to_str().unwrap(),
                "--name",
                &format!("slave-{i}"),
            ],
            &self.secret,
            self.dir.path(),
        )
    }

    pub async fn clients(&self) -> (ish_cli::local::BuildsClient, ish_cli::local::ClusterClient) {
        ish_cli::local::connect(&self.url, &self.secret, Duration::from_secs(10))
            .await
            .unwrap()
    }

    pub async fn wait_slaves(&self, n: usize) {
        let (_, mut cl) = self.clients().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = cl
                .list_slaves(proto::ListSlavesRequest {})
                .await
                .unwrap()
                .into_inner()
                .slaves
                .len();
            if got == n {
                return;
            }
            assert!(Instant::now() < deadline, "{got} of {n} slaves registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9 the master, then start it again on the same address and data dir.
    pub fn crash_and_restart_master(&mut self, downtime: Duration) {
        let master_dir = self.dir.path().join("master");
        let addr = std::fs::read_to_string(master_dir.join("master.addr")).unwrap();
        assert_eq!(
            self.master
                .signal_and_wait(Signal::SIGKILL, Duration::from_secs(5)),
            None
        );
        std::thread::sleep(downtime);
        let conf = self.dir.path().join("master.toml");
        let mut args = vec![
            "master",
            "--listen",
            addr.trim(),
            "--data-dir",
            master_dir.to_str().unwrap(),
        ];
        if conf.exists() {
            args.extend(["--config", conf.to_str().unwrap()]);
        }
        self.restarts += 1;
        let name = format!("master-{}", self.restarts);
        self.master = Proc::spawn(&name, &args, &self.secret, self.dir.path());
    }

    /// Every log of the cluster so far (for failure messages).
    pub fn logs(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                format!(
                    "==> {}\n{}",
                    p.display(),
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Starts `ish gateway` on a free port; returns its base URL and the process.
    pub fn start_gateway(&self) -> (String, Proc) {
        let gw = Proc::spawn(
            "gateway",
            &["gateway", "--listen", "127.0.0.1:0", "--master", &self.url],
            &self.secret,
            self.dir.path(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = gw.log();
            if let Some(i) = log.find("Some(") {
                let rest = &log[i + 5..];
                let addr = &rest[..rest.find(')').unwrap()];
                return (format!("http://{addr}"), gw);
            }
            assert!(Instant::now() < deadline, "gateway did not start:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM every role; each must exit 0.
    pub fn stop(mut self) {
        for s in &mut self.slaves {
            if s.child.is_some() {
                assert_eq!(
                    s.signal_and_wait(Signal::SIGTERM, Duration::from_secs(15)),
                    Some(0),
                    "{}",
                    s.log()
                );
            }
        }
        assert_eq!(
            self.master
                .signal_and_wait(Signal::SIGTERM, Duration::from_secs(15)),
            Some(0),
            "{}",
            self.master.log()
        );
    }
}
