//! A process of one of camelid's own binaries started by a test (the operator, the gateway): its output in a log
//! file, printed when the test fails, and killed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One of camelid's binaries running as a local process, its output in a log file; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, dir: &Path, command: &mut Command) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let file = File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap_or_else(|e| panic!("{name}'s log: {e}")))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Daemon {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a node loss or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}):\n{}",
                self.name,
                self.log.display(),
                super::process::tail(&self.log, 40)
            );
        }
        self.kill();
    }
}

/// The path of another workspace binary (the gateway's, the worker's) beside the running test's own target
/// directory. `cargo test --workspace` builds every workspace binary before it runs any test; a narrower run builds
/// it here. (Only when missing: `cargo build -p` alone unifies features differently and would rebuild kube.)
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("the test's own path: {e}"));
    // target/<profile>/deps/<test> → target/<profile>/<bin>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join(bin))
        .unwrap_or_else(|| panic!("no target directory above {}", exe.display()));
    if !path.is_file() {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "-p", package, "--bin", bin])
            .current_dir(crate::workspace())
            .status()
            .unwrap_or_else(|e| panic!("run cargo: {e}"));
        assert!(status.success(), "cargo build -p {package} --bin {bin}");
    }
    path
}
