//! The "restricted" Pod Security Standard (Kubernetes 1.33, baseline rules included), as a pure check over a
//! pod spec, plus camelid's own two rules: read-only root filesystems and no ServiceAccount token. Every pod
//! template the operator builds is held to it by tests, so a namespace labelled
//! `pod-security.kubernetes.io/enforce: restricted` admits camelid's pods; the chart's Deployments are checked
//! with the same function.

use k8s_openapi::api::core::v1::{Container, PodSpec, SecurityContext};

/// Volume types the restricted profile allows.
const VOLUME_TYPES: &[&str] = &[
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
];

/// What `spec` breaks of the restricted profile and camelid's own rules, one line each naming the container or
/// field; empty when it meets them all.
pub fn violations(spec: &PodSpec) -> Vec<String> {
    let mut v = Vec::new();
    for (flag, name) in [
        (spec.host_network, "hostNetwork"),
        (spec.host_pid, "hostPID"),
        (spec.host_ipc, "hostIPC"),
    ] {
        if flag == Some(true) {
            v.push(format!("{name} is true"));
        }
    }
    if spec.automount_service_account_token != Some(false) {
        v.push("automountServiceAccountToken is not false".into());
    }
    let pod = spec.security_context.clone().unwrap_or_default();
    let pod_seccomp = pod.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    if matches!(pod_seccomp, Some(t) if t != "RuntimeDefault" && t != "Localhost") {
        v.push(format!("pod seccompProfile {pod_seccomp:?}"));
    }
    if pod.run_as_user == Some(0) {
        v.push("pod runAsUser is 0".into());
    }
    for sysctl in pod.sysctls.iter().flatten() {
        v.push(format!(
            "pod sysctl {} (only the safe set is allowed)",
            sysctl.name
        ));
    }
    for volume in spec.volumes.iter().flatten() {
        let value = serde_json::to_value(volume).unwrap_or_default();
        let kinds: Vec<&String> = value
            .as_object()
            .map(|o| o.keys().filter(|k| *k != "name").collect())
            .unwrap_or_default();
        for kind in kinds {
            if !VOLUME_TYPES.contains(&kind.as_str()) {
                v.push(format!("volume {} is a {kind}", volume.name));
            }
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        container(c, &pod, &mut v);
    }
    v
}

fn container(c: &Container, pod: &k8s_openapi::api::core::v1::PodSecurityContext, v: &mut Vec<String>) {
    let name = &c.name;
    let sc: SecurityContext = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        v.push(format!("{name}: privileged"));
    }
    if sc.allow_privilege_escalation != Some(false) {
        v.push(format!("{name}: allowPrivilegeEscalation is not false"));
    }
    let caps = sc.capabilities.clone().unwrap_or_default();
    if !caps.drop.iter().flatten().any(|d| d == "ALL") {
        v.push(format!("{name}: capabilities do not drop ALL"));
    }
    for add in caps.add.iter().flatten() {
        if add != "NET_BIND_SERVICE" {
            v.push(format!("{name}: adds capability {add}"));
        }
    }
    let non_root = sc.run_as_non_root.or(pod.run_as_non_root);
    if non_root != Some(true) {
        v.push(format!("{name}: runAsNonRoot is not true"));
    }
    if sc.run_as_user == Some(0) {
        v.push(format!("{name}: runAsUser is 0"));
    }
    let seccomp = sc
        .seccomp_profile
        .as_ref()
        .or(pod.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
        v.push(format!(
            "{name}: seccompProfile is {seccomp:?}, not RuntimeDefault"
        ));
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        v.push(format!("{name}: procMount"));
    }
    if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
        v.push(format!("{name}: hostProcess"));
    }
    if sc.read_only_root_filesystem != Some(true) {
        v.push(format!("{name}: readOnlyRootFilesystem is not true"));
    }
    for port in c.ports.iter().flatten() {
        if port.host_port.is_some_and(|p| p != 0) {
            v.push(format!("{name}: hostPort {:?}", port.host_port));
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{HostPathVolumeSource, Volume};

    use super::*;

    /// The checker itself catches what the profile forbids: a pod as a careless builder would write it.
    #[test]
    fn a_plain_pod_breaks_the_restricted_profile_in_every_way_it_is_checked() {
        let mut spec = PodSpec {
            containers: vec![Container {
                name: "main".into(),
                ..Container::default()
            }],
            host_network: Some(true),
            volumes: Some(vec![Volume {
                name: "root".into(),
                host_path: Some(HostPathVolumeSource {
                    path: "/".into(),
                    type_: None,
                }),
                ..Volume::default()
            }]),
            ..PodSpec::default()
        };
        let v = violations(&spec);
        for expected in [
            "hostNetwork is true",
            "automountServiceAccountToken",
            "volume root is a hostPath",
            "main: allowPrivilegeEscalation",
            "main: capabilities do not drop ALL",
            "main: runAsNonRoot",
            "main: seccompProfile",
            "main: readOnlyRootFilesystem",
        ] {
            assert!(v.iter().any(|l| l.contains(expected)), "{expected} not in {v:?}");
        }
        spec.host_network = None;
        spec.volumes = None;
        crate::pod::harden(&mut spec, "smol-worker");
        assert_eq!(violations(&spec), Vec::<String>::new());
    }
}
