//! A real Kubernetes control plane for camelid's tests: etcd, kube-apiserver (RBAC, service-account tokens, loopback
//! only), kube-controller-manager, kube-scheduler and kwok (fake nodes and pods), each started from the binaries that
//! `tools/k8s-bins.sh` builds from source, on free ports in a temporary directory.
//!
//! Every process is stopped by PID when the [`ControlPlane`] is dropped, which a failing test's unwinding does too;
//! a watchdog shell, whose stdin the harness holds open, kills them if the test process itself dies without
//! unwinding (a timeout's SIGKILL). When the drop happens during a panic, the tail of each process's log is printed
//! so that a failure in the control plane is visible in the test's output.

mod daemon;
mod nodes;
mod process;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub use daemon::{Daemon, workspace_binary};
pub use nodes::FakeNode;
use process::Processes;

use crate::{free_port, workspace};

/// What can go wrong starting or driving the control plane.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "{binary} is not in {dir}: build the Kubernetes tools with `tools/k8s-bins.sh` (`make test` runs it)"
    )]
    MissingBinary { binary: String, dir: String },
    #[error("tools/k8s-bins.sh --print-dir failed: {0}")]
    BinDir(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} did not become ready in time; its log:\n{1}")]
    NotReady(String, String),
    #[error("`{command}` failed ({status}):\n{stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// The directory holding the built binaries: `CAMELID_K8S_BIN` when set, else what `tools/k8s-bins.sh --print-dir`
/// says (the script is the one place the cache key is written).
pub fn bin_dir() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("CAMELID_K8S_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let out = Command::new(workspace().join("tools/k8s-bins.sh"))
        .arg("--print-dir")
        .output()
        .map_err(io("run tools/k8s-bins.sh --print-dir"))?;
    if !out.status.success() {
        return Err(HarnessError::BinDir(
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The path of one built tool (`kubectl`, `helm`, ...), or an error naming the build script.
pub fn binary(name: &str) -> Result<PathBuf, HarnessError> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if dir.join(".ok").is_file() && path.is_file() {
        Ok(path)
    } else {
        Err(HarnessError::MissingBinary {
            binary: name.to_string(),
            dir: dir.display().to_string(),
        })
    }
}

/// A running control plane. Drop it to stop every process it started.
#[derive(Debug)]
pub struct ControlPlane {
    processes: Processes,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    kubeconfig: PathBuf,
    ca: PathBuf,
    bin: PathBuf,
    // Last, so the processes are stopped before their files are removed.
    dir: tempfile::TempDir,
}

const ADMIN_TOKEN_USER: &str = "camelid-test-admin";

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok, and waits until the API
    /// server is ready and the default ServiceAccount of `default` exists. Blocking; a few seconds on 2 cores.
    pub fn start() -> Result<ControlPlane, HarnessError> {
        let bin = bin_dir()?;
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        ] {
            binary(name)?;
        }
        // CAMELID_K8S_KEEP=1 keeps the directory (logs, kubeconfig, etcd data) for a look afterwards.
        let keep = std::env::var_os("CAMELID_K8S_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("camelid-k8s-")
            .disable_cleanup(keep)
            .tempdir()
            .map_err(io("create the control plane's directory"))?;
        let d = dir.path().to_path_buf();
        let mut processes = Processes::new(&d)?;
        let token = random_token()?;
        std::fs::write(
            d.join("tokens.csv"),
            format!("{token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},\"system:masters\"\n"),
        )
        .map_err(io("write tokens.csv"))?;
        run_ok(
            Command::new("openssl")
                .args(["genrsa", "-out"])
                .arg(d.join("sa.key"))
                .arg("2048"),
        )?;

        let etcd_port = free_port();
        processes.spawn(
            "etcd",
            Command::new(bin.join("etcd")).args([
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{}", free_port()),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ]),
        )?;

        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        let sa_key = d.join("sa.key").display().to_string();
        processes.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args([
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", d.join("pki").display()),
                format!("--token-auth-file={}", d.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={sa_key}"),
                format!("--service-account-signing-key-file={sa_key}"),
                "--endpoint-reconciler-type=none".into(),
                "--profiling=false".into(),
            ]),
        )?;
        let ca = d.join("pki/apiserver.crt");
        let kubeconfig = d.join("kubeconfig");
        let mut plane = ControlPlane {
            processes,
            server,
            kubeconfig: kubeconfig.clone(),
            ca,
            bin: bin.clone(),
            dir,
        };
        std::fs::write(&kubeconfig, plane.kubeconfig_for(ADMIN_TOKEN_USER, &token))
            .map_err(io("write the kubeconfig"))?;
        plane.wait_for_apiserver()?;
        plane.start_controllers(&sa_key)?;
        plane.wait_for("the default ServiceAccount", || {
            plane
                .kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                .is_ok()
        })?;
        Ok(plane)
    }

    fn wait_for_apiserver(&self) -> Result<(), HarnessError> {
        // The serving certificate appears first, then /readyz answers.
        self.wait_for("kube-apiserver's certificate", || self.ca.is_file())?;
        self.wait_for("kube-apiserver /readyz", || {
            self.kubectl(&["get", "--raw", "/readyz"]).is_ok()
        })
    }

    fn start_controllers(&mut self, sa_key: &str) -> Result<(), HarnessError> {
        let kubeconfig = format!("--kubeconfig={}", self.kubeconfig.display());
        let controllers = [
            "job-controller",
            "deployment-controller",
            "replicaset-controller",
            "garbage-collector-controller",
            "namespace-controller",
            "serviceaccount-controller",
            "serviceaccount-token-controller",
            "endpointslice-controller",
            "endpointslice-mirroring-controller",
            "disruption-controller",
            "pod-garbage-collector-controller",
            "node-lifecycle-controller",
            "taint-eviction-controller",
            "ttl-after-finished-controller",
            "persistentvolume-binder-controller",
        ]
        .join(",");
        let bin = self.bin.clone();
        self.processes.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args([
                kubeconfig.clone(),
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                format!("--controllers={controllers}"),
                format!("--service-account-private-key-file={sa_key}"),
                format!("--root-ca-file={}", self.ca.display()),
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
                // Quick node-lifecycle reactions, as on a cloud with fast node health checks.
                "--node-monitor-period=2s".into(),
                "--node-monitor-grace-period=20s".into(),
                "--terminated-pod-gc-threshold=100".into(),
            ]),
        )?;
        self.processes.spawn(
            "kube-scheduler",
            Command::new(bin.join("kube-scheduler")).args([
                kubeconfig.clone(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
                "--kube-api-qps=200".into(),
                "--kube-api-burst=400".into(),
            ]),
        )?;
        self.processes.spawn(
            "kwok",
            Command::new(bin.join("kwok")).args([
                kubeconfig,
                format!(
                    "--config={}",
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("stages.yaml")
                        .display()
                ),
                "--manage-all-nodes=false".into(),
                format!(
                    "--manage-nodes-with-annotation-selector={}",
                    nodes::KWOK_ANNOTATION
                ),
                "--node-lease-duration-seconds=40".into(),
                "--cidr=10.244.0.0/16".into(),
                "--node-ip=10.244.0.1".into(),
                format!("--server-address=127.0.0.1:{}", free_port()),
            ]),
        )
    }

    /// A kubeconfig for `user` with a bearer token, trusting the API server's self-signed certificate.
    pub fn kubeconfig_for(&self, user: &str, token: &str) -> String {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {
                "server": self.server, "certificate-authority": self.ca.display().to_string()}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user, "namespace": "default"}}],
        })
        .to_string()
    }

    /// The administrator's kubeconfig (a static token in group `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The temporary directory the control plane's files and logs live in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An administrator's kube client.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }

    /// A kubeconfig file acting as ServiceAccount `namespace/name`, with a token from the TokenRequest API.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf, HarnessError> {
        let token = self.kubectl(&["create", "token", name, "-n", namespace, "--duration=2h"])?;
        let path = self.dir.path().join(format!("kubeconfig-{namespace}-{name}"));
        std::fs::write(&path, self.kubeconfig_for(name, token.trim())).map_err(io("write kubeconfig"))?;
        Ok(path)
    }

    /// A command for one of the built tools, with the administrator's kubeconfig in its environment.
    pub fn command(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.path().join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.path().join("helm/data"));
        c
    }

    /// Runs kubectl as the administrator; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, HarnessError> {
        run_ok(self.command("kubectl").args(args)).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Runs kubectl as the administrator and returns its whole output, whatever its exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output, HarnessError> {
        self.command("kubectl")
            .args(args)
            .output()
            .map_err(io("run kubectl"))
    }

    /// Runs helm as the administrator; its stdout, or an error with its stderr.
    pub fn helm(&self, args: &[&str]) -> Result<String, HarnessError> {
        run_ok(self.command("helm").args(args)).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `kubectl apply -f` of `doc` (JSON or YAML) as the administrator, with `extra` flags; kubectl's whole
    /// output, whatever its exit status (a test of a refusal reads its stderr).
    pub fn apply_output(&self, doc: &str, extra: &[&str]) -> Result<Output, HarnessError> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let path = self
            .dir
            .path()
            .join(format!("apply-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, doc).map_err(io(format!("write {}", path.display())))?;
        let file = path.display().to_string();
        let mut args = vec!["apply", "-f", file.as_str()];
        args.extend(extra);
        self.kubectl_output(&args)
    }

    /// `kubectl apply -f` of `doc` as the administrator; an error with kubectl's stderr if it is refused.
    pub fn apply(&self, doc: &str) -> Result<(), HarnessError> {
        let out = self.apply_output(doc, &[])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HarnessError::Command {
                command: format!(
                    "kubectl apply -f <{}...>",
                    doc.chars().take(80).collect::<String>()
                ),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// `kubectl get <args> -o json` as the administrator, parsed; `Value::Null` when it does not exist or the
    /// request fails.
    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend(args);
        all.extend(["-o", "json", "--ignore-not-found"]);
        let out = self.kubectl(&all).unwrap_or_default();
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    /// What the operator needs that the chart would install: camelid's CRDs (from `charts/camelid/crds`),
    /// established, and the operator's namespace `camelid-system`.
    pub fn install_crds(&self) -> Result<(), HarnessError> {
        let crds = workspace().join("charts/camelid/crds");
        self.kubectl(&["apply", "-f", &crds.display().to_string()])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ])?;
        self.kubectl(&["create", "namespace", "camelid-system"]).map(drop)
    }

    /// Creates a node that kwok keeps Ready.
    pub fn add_node(&self, node: &FakeNode) -> Result<(), HarnessError> {
        self.apply(&node.manifest().to_string())
    }

    /// A ReadWriteMany PersistentVolumeClaim `namespace/name`, bound to its own hostPath volume (the real
    /// persistent-volume controller binds them), so that pods using it can be scheduled.
    pub fn add_claim(&self, namespace: &str, name: &str) -> Result<(), HarnessError> {
        let volume = format!("{namespace}-{name}");
        let docs = [
            serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
                "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                    "hostPath": {"path": format!("/tmp/camelid-test-volumes/{volume}")},
                    "claimRef": {"namespace": namespace, "name": name}}}),
            serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                    "resources": {"requests": {"storage": "100Gi"}}}}),
        ];
        docs.iter().try_for_each(|doc| self.apply(&doc.to_string()))
    }

    fn wait_for(&self, what: &str, mut ready: impl FnMut() -> bool) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ready() {
            if let Some(exited) = self.processes.exited() {
                return Err(HarnessError::NotReady(what.into(), exited));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady(what.into(), self.processes.log_tails()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

/// Polls `check` every 200 ms until it holds, or panics after `seconds` naming `what`.
pub fn wait_until(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {seconds} s waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> kube::Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("kubeconfig {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"))
}

/// This host's first non-loopback IPv4 address: what a test that plays the kubelet gives its pods, since the API
/// server refuses loopback addresses in EndpointSlices (as it should: they would point each client at itself).
pub fn host_ip() -> Result<String, HarnessError> {
    let out = run_ok(Command::new("hostname").arg("-I"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| !ip.is_loopback()))
        .map(str::to_string)
        .ok_or_else(|| HarnessError::Io {
            what: "find a non-loopback IPv4 address of this host (`hostname -I`)".into(),
            source: std::io::Error::other("none"),
        })
}

fn random_token() -> Result<String, HarnessError> {
    let out = run_ok(Command::new("openssl").args(["rand", "-hex", "24"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run_ok(command: &mut Command) -> Result<Output, HarnessError> {
    let shown = format!("{command:?}");
    let out = command.output().map_err(io(format!("run {shown}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(HarnessError::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
