//! The control plane's processes: started with their output in log files, stopped by PID (SIGTERM, then SIGKILL
//! after a grace period), and guarded by a watchdog that kills them if the test process dies without unwinding.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use super::{HarnessError, io};

#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

/// The processes of one control plane, in start order.
#[derive(Debug)]
pub(crate) struct Processes {
    dir: PathBuf,
    /// Behind a lock so that readiness checks, which borrow the control plane shared, can poll for exits.
    procs: std::sync::Mutex<Vec<Proc>>,
    /// The watchdog's stdin: it reads until EOF, which comes when this end is closed, by drop or by the death of
    /// the test process, and then kills every PID it was told.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Processes {
    pub(crate) fn new(dir: &Path) -> Result<Processes, HarnessError> {
        // Reads PIDs, one per line, until stdin closes; then kills them all.
        let mut watchdog = Command::new("sh")
            .args([
                "-c",
                "pids=; while read -r p; do pids=\"$pids $p\"; done; kill -9 $pids 2>/dev/null; exit 0",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("start the watchdog shell"))?;
        let stdin = watchdog.stdin.take().ok_or_else(|| HarnessError::Io {
            what: "the watchdog's stdin".into(),
            source: std::io::Error::other("not piped"),
        })?;
        Ok(Processes {
            dir: dir.to_path_buf(),
            procs: std::sync::Mutex::new(Vec::new()),
            watchdog: Some((watchdog, stdin)),
        })
    }

    pub(crate) fn spawn(&mut self, name: &str, command: &mut Command) -> Result<(), HarnessError> {
        use std::io::Write;
        let log = self.dir.join(format!("{name}.log"));
        let file = File::create(&log).map_err(io(format!("create {}", log.display())))?;
        let err = file.try_clone().map_err(io("clone a log file"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(io(format!("start {name}")))?;
        if let Some((_, stdin)) = &mut self.watchdog {
            writeln!(stdin, "{}", child.id()).map_err(io("tell the watchdog a PID"))?;
        }
        self.lock().push(Proc {
            name: name.to_string(),
            child,
            log,
        });
        Ok(())
    }

    /// The first process that has exited, with its status and log tail.
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Proc>> {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn exited(&self) -> Option<String> {
        self.lock().iter_mut().find_map(|p| {
            let status = p.child.try_wait().ok().flatten()?;
            Some(format!("{} exited ({status}):\n{}", p.name, tail(&p.log, 40)))
        })
    }

    pub(crate) fn log_tails(&self) -> String {
        let mut out = String::new();
        for p in self.lock().iter() {
            let _ = writeln!(out, "--- {} ({}):\n{}", p.name, p.log.display(), tail(&p.log, 25));
        }
        out
    }

    fn stop_all(&mut self) {
        // Newest first: the API server's clients go before the API server, which goes before etcd.
        for p in self.lock().iter_mut().rev() {
            let pid = p.child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if let Some((mut watchdog, stdin)) = self.watchdog.take() {
            drop(stdin);
            let _ = watchdog.wait();
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("control plane logs (the test failed):\n{}", self.log_tails());
        }
        self.stop_all();
    }
}

/// The last `lines` lines of a log file.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
