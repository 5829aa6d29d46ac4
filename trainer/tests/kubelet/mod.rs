//! The kubelet of the nodes a test plays (`FakeNode::played_by_test`), against a real control plane: it runs each
//! pod's first container as a local process (the command and args from the pod spec, each claim's mount path
//! mapped to a local directory, every pod on this host's own address: the API server refuses loopback endpoints), reports the pod Running and, for pods with a readiness
//! probe, Ready once the probe's HTTP path answers 200; on a pod's deletion it sends SIGTERM and waits; when the
//! process exits it reports the exit code and phase, and removes a deleted pod. It also keeps its nodes' Leases and
//! Ready conditions fresh, as a kubelet's heartbeats do.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use camelid_test_support::k8s::ControlPlane;
use serde_json::{Value, json};

/// Where a container's command is found: its first word mapped to a local binary.
pub type Binaries = BTreeMap<String, PathBuf>;

struct Running {
    namespace: String,
    name: String,
    child: Child,
    /// The readiness probe's `http://127.0.0.1:<port><path>`, if any.
    probe: Option<String>,
    ready: bool,
    sigterm_sent: bool,
    reported_exit: bool,
}

/// What the test can read of the kubelet's work.
#[derive(Default)]
pub struct Record {
    /// Pod names whose process got SIGTERM.
    pub sigterms: Vec<String>,
    /// (pod, exit code) of every process that exited.
    pub exits: Vec<(String, i32)>,
    pub started: Vec<String>,
}

pub struct Kubelet {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub record: Arc<Mutex<Record>>,
}

struct State {
    cp: Arc<ControlPlane>,
    nodes: Vec<String>,
    claims: PathBuf,
    binaries: Binaries,
    /// Rewrites of container arguments (a fixed port to a free one, say), applied after the claim mapping.
    rewrites: Vec<(String, String)>,
    env: Vec<(String, String)>,
    pods: BTreeMap<String, Running>,
    record: Arc<Mutex<Record>>,
    last_heartbeat: Option<Instant>,
    logs: PathBuf,
    pod_ip: String,
}

/// Starts the kubelet of `nodes` in a thread. `claims` holds one directory per PersistentVolumeClaim name.
pub fn start(
    cp: Arc<ControlPlane>,
    nodes: &[&str],
    claims: &Path,
    binaries: Binaries,
    rewrites: Vec<(String, String)>,
    env: Vec<(String, String)>,
) -> Kubelet {
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(Mutex::new(Record::default()));
    let logs = cp.dir().to_path_buf();
    let pod_ip = camelid_test_support::k8s::host_ip().unwrap();
    let mut state = State {
        cp,
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        claims: claims.to_path_buf(),
        binaries,
        rewrites,
        env,
        pods: BTreeMap::new(),
        record: record.clone(),
        last_heartbeat: None,
        logs,
        pod_ip,
    };
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            state.heartbeat();
            state.sync();
            std::thread::sleep(Duration::from_millis(250));
        }
        for (_, mut p) in std::mem::take(&mut state.pods) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    });
    Kubelet {
        stop,
        thread: Some(thread),
        record,
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now() -> String {
    // MicroTime and Time both accept RFC 3339 with a Z suffix.
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl State {
    fn kubectl(&self, args: &[&str]) -> Option<String> {
        self.cp.kubectl(args).ok()
    }

    fn patch_status(&self, namespace: &str, kind: &str, name: &str, patch: &Value) {
        let p = patch.to_string();
        let mut args = vec![
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            p.as_str(),
        ];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        let _ = self.kubectl(&args);
    }

    /// Node Leases and Ready conditions, every 5 s, so that the node-lifecycle controller keeps the nodes Ready.
    fn heartbeat(&mut self) {
        if self
            .last_heartbeat
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.last_heartbeat = Some(Instant::now());
        let now = now();
        for node in self.nodes.clone() {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40, "renewTime": now}});
            let _ = self
                .cp
                .apply_output(&lease.to_string(), &["--server-side", "--field-manager=kubelet"]);
            let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
            self.patch_status("", "node", &node, &status);
        }
    }

    fn sync(&mut self) {
        let Some(out) = self.kubectl(&["get", "pods", "-A", "-o", "json"]) else {
            return;
        };
        let pods: Value = serde_json::from_str(&out).unwrap_or_default();
        let mut seen = Vec::new();
        for pod in pods["items"].as_array().cloned().unwrap_or_default() {
            let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
            if !self.nodes.iter().any(|n| n == node) {
                continue;
            }
            let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
            seen.push(uid.clone());
            if !self.pods.contains_key(&uid)
                && pod["metadata"]["deletionTimestamp"].is_null()
                && pod["status"]["phase"] == "Pending"
            {
                self.run(&uid, &pod);
            }
            self.follow(&uid, &pod);
        }
        // Pods removed from the API (force-deleted, garbage-collected): their processes go too.
        let gone: Vec<String> = self.pods.keys().filter(|u| !seen.contains(u)).cloned().collect();
        for uid in gone {
            if let Some(mut p) = self.pods.remove(&uid) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }

    fn run(&mut self, uid: &str, pod: &Value) {
        let namespace = pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let spec = &pod["spec"];
        let container = &spec["containers"][0];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        };
        let command = strings(&container["command"]);
        let binary = self
            .binaries
            .get(command.first().map(String::as_str).unwrap_or_default())
            .unwrap_or_else(|| panic!("{name}: no local binary for command {command:?}"))
            .clone();
        // Each claim's mount path maps to the claim's local directory.
        let mut mounts = Vec::new();
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() else {
                continue;
            };
            for m in container["volumeMounts"].as_array().into_iter().flatten() {
                if m["name"] == volume["name"] {
                    let local = self.claims.join(claim);
                    std::fs::create_dir_all(&local).unwrap();
                    mounts.push((
                        m["mountPath"].as_str().unwrap().to_string(),
                        local.display().to_string(),
                    ));
                }
            }
        }
        let map = |arg: &str| -> String {
            let mut a = arg.to_string();
            for (from, to) in &mounts {
                a = a.replace(from.as_str(), to);
            }
            for (from, to) in &self.rewrites {
                a = a.replace(from.as_str(), to);
            }
            a
        };
        let args: Vec<String> = command[1..]
            .iter()
            .chain(strings(&container["args"]).iter())
            .map(|a| map(a))
            .collect();
        let log = std::fs::File::create(self.logs.join(format!("pod-{name}.log"))).unwrap();
        let mut cmd = Command::new(binary);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env("CAMELID_LOG", "info");
        for e in container["env"].as_array().into_iter().flatten() {
            if let Some(v) = e["value"].as_str() {
                cmd.env(e["name"].as_str().unwrap(), map(v));
            }
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: start {args:?}: {e}"));
        let probe = container["readinessProbe"]["httpGet"]["path"]
            .as_str()
            .map(|path| {
                let port = &container["readinessProbe"]["httpGet"]["port"];
                let number = port.as_i64().or_else(|| {
                    container["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["name"] == *port)
                        .and_then(|p| p["containerPort"].as_i64())
                });
                format!("{}:{}{path}", self.pod_ip, number.unwrap_or(0))
            });
        let now = now();
        let ready = probe.is_none();
        let ip = &self.pod_ip;
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "hostIP": ip, "hostIPs": [{"ip": ip}], "startTime": now,
            "conditions": conditions(ready, &now),
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                "ready": ready, "restartCount": 0, "started": true, "state": {"running": {"startedAt": now}}}]}});
        self.patch_status(&namespace, "pod", &name, &status);
        self.record.lock().unwrap().started.push(name.clone());
        self.pods.insert(
            uid.to_string(),
            Running {
                namespace,
                name,
                child,
                probe,
                ready,
                sigterm_sent: false,
                reported_exit: false,
            },
        );
    }

    fn follow(&mut self, uid: &str, pod: &Value) {
        let deleting = !pod["metadata"]["deletionTimestamp"].is_null();
        let Some(p) = self.pods.get_mut(uid) else {
            if deleting {
                // Never started here: nothing to stop.
                let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
                let _ = self.cp.kubectl(&[
                    "delete",
                    "pod",
                    name,
                    "-n",
                    ns,
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                ]);
            }
            return;
        };
        if deleting && !p.sigterm_sent {
            let _ = Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status();
            p.sigterm_sent = true;
            self.record.lock().unwrap().sigterms.push(p.name.clone());
        }
        let exited = p.child.try_wait().ok().flatten();
        let (namespace, name) = (p.namespace.clone(), p.name.clone());
        if let Some(status) = exited {
            if !p.reported_exit {
                p.reported_exit = true;
                let code = status.code().unwrap_or(137);
                self.record.lock().unwrap().exits.push((name.clone(), code));
                let container = pod["spec"]["containers"][0]["name"].clone();
                let now = now();
                let report = json!({"status": {"phase": if code == 0 { "Succeeded" } else { "Failed" },
                    "conditions": conditions(false, &now),
                    "containerStatuses": [{"name": container, "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "", "ready": false, "restartCount": 0, "started": false,
                        "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" },
                            "startedAt": pod["status"]["startTime"], "finishedAt": now}}}]}});
                self.patch_status(&namespace, "pod", &name, &report);
            }
            if deleting {
                let _ = self.cp.kubectl(&[
                    "delete",
                    "pod",
                    &name,
                    "-n",
                    &namespace,
                    "--grace-period=0",
                    "--force",
                    "--wait=false",
                ]);
            }
            return;
        }
        if !p.ready
            && let Some(url) = &p.probe
            && http_ok(url)
        {
            p.ready = true;
            let now = now();
            let patch = json!({"status": {"conditions": conditions(true, &now),
                "containerStatuses": [{"name": pod["spec"]["containers"][0]["name"], "image": pod["spec"]["containers"][0]["image"],
                    "imageID": "", "ready": true, "restartCount": 0, "started": true,
                    "state": {"running": {"startedAt": pod["status"]["startTime"]}}}]}});
            self.patch_status(&namespace, "pod", &name, &patch);
        }
    }
}

fn conditions(ready: bool, now: &str) -> Value {
    let s = if ready { "True" } else { "False" };
    json!([{"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
           {"type": "Initialized", "status": "True", "lastTransitionTime": now},
           {"type": "ContainersReady", "status": s, "lastTransitionTime": now},
           {"type": "Ready", "status": s, "lastTransitionTime": now}])
}

/// GET `<ip>:<port><path>` answers 200.
pub fn http_ok(url: &str) -> bool {
    use std::io::{Read, Write};
    let Some((addr, path)) = url.split_once('/').map(|(a, p)| (a.to_string(), format!("/{p}"))) else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = String::new();
    let _ = s.read_to_string(&mut head);
    head.split(' ').nth(1) == Some("200")
}
