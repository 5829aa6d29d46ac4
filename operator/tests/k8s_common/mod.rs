//! Shared by the operator's tests that run against a real control plane (`camelid-k8s-harness`, which holds what
//! other crates' cluster tests share too): the cluster a test starts from, the operator as a process, names of
//! listed objects, Events, kubectl tables.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::Path;
use std::process::Command;

use camelid_test_support::k8s::{ControlPlane, Daemon, FakeNode};

/// A control plane with the CRDs installed, the volume claims `claims` in `namespace` and `nodes` joined: what the
/// operator's cluster tests start from, before what each adds of its own.
pub fn cluster(namespace: &str, claims: &[&str], nodes: &[FakeNode]) -> ControlPlane {
    let cp = ControlPlane::start().unwrap();
    cp.install_crds().unwrap();
    for claim in claims {
        cp.add_claim(namespace, claim).unwrap();
    }
    for node in nodes {
        cp.add_node(node).unwrap();
    }
    cp
}

/// The names of `kubectl get <args>`'s items.
pub fn names(cp: &ControlPlane, args: &[&str]) -> Vec<String> {
    cp.get_json(args)["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i["metadata"]["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The operator as a local process, acting with the credentials in `kubeconfig`.
pub fn operator(cp: &ControlPlane, name: &str, kubeconfig: &Path, extra: &[&str]) -> Daemon {
    let mut c = Command::new(env!("CARGO_BIN_EXE_camelid-operator"));
    c.env("KUBECONFIG", kubeconfig)
        .env("CAMELID_LOG", "info,kube=warn")
        .env("POD_NAME", name)
        .args([
            "run",
            "--namespace",
            "camelid-system",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--health-addr", "127.0.0.1:0"])
        .args(extra);
    Daemon::start(name, cp.dir(), &mut c)
}

/// The one operator of a test, named `operator`, with the control plane's admin credentials.
pub fn admin_operator(cp: &ControlPlane, extra: &[&str]) -> Daemon {
    operator(cp, "operator", cp.kubeconfig(), extra)
}

/// The `kubectl get events` table of `namespace`, of the Events that match `field_selector` (such as
/// `reason=NameConflict` or `involvedObject.name=<object>`).
pub fn events(cp: &ControlPlane, namespace: &str, field_selector: &str) -> String {
    cp.kubectl(&[
        "get",
        "events",
        "-n",
        namespace,
        "--field-selector",
        field_selector,
    ])
    .unwrap()
}

/// The rows of a plain `kubectl get` table, as (column, value) pairs: columns are cut at the header's word starts,
/// since values such as `100/400 (25%)` hold spaces.
pub fn table(text: &str) -> Vec<Vec<(String, String)>> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let mut starts = Vec::new();
    let mut previous = ' ';
    for (i, c) in header.char_indices() {
        if c != ' ' && previous == ' ' {
            starts.push(i);
        }
        previous = c;
    }
    let cell = |line: &str, i: usize| -> String {
        let end = starts.get(i + 1).copied().unwrap_or(usize::MAX).min(line.len());
        line.get(starts[i].min(line.len())..end)
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    lines
        .map(|line| {
            (0..starts.len())
                .map(|i| (cell(header, i), cell(line, i)))
                .collect()
        })
        .collect()
}
