//! The in-memory API server against kube-rs's own client and watcher: what camelid's controllers rely on behaves
//! as a real API server's does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use camelid_memory_apiserver::MemoryApiServer;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;

async fn client(server: &MemoryApiServer) -> Client {
    server.client().unwrap()
}

fn config_map(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn create_get_list_with_selectors_and_stale_updates_conflict() {
    let server = MemoryApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(client(&server).await);
    let created = api
        .create(
            &PostParams::default(),
            &config_map("a", &[("tier", "gold")], &[("k", "1")]),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
    api.create(
        &PostParams::default(),
        &config_map("b", &[("tier", "silver")], &[]),
    )
    .await
    .unwrap();
    let e = api
        .create(&PostParams::default(), &config_map("a", &[], &[]))
        .await
        .unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 409), "{e}");
    let names = |list: kube::core::ObjectList<ConfigMap>| -> Vec<String> {
        list.items.into_iter().map(|c| c.metadata.name.unwrap()).collect()
    };
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("tier=gold"))
                .await
                .unwrap()
        ),
        ["a"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("tier in (gold,silver)"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("tier!=gold"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    // A write based on an old resourceVersion is refused.
    let mut stale = created.clone();
    let mut fresh = created;
    fresh.data = Some(BTreeMap::from([("k".to_string(), "2".to_string())]));
    api.replace("a", &PostParams::default(), &fresh).await.unwrap();
    stale.data = Some(BTreeMap::from([("k".to_string(), "3".to_string())]));
    let e = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{e}"
    );
    assert!(matches!(api.get("zzz").await.unwrap_err(), kube::Error::Api(s) if s.code == 404));
}

#[tokio::test]
async fn server_side_apply_owns_fields_conflicts_and_changes_nothing_when_repeated() {
    let server = MemoryApiServer::start().await.unwrap();
    let api: Api<ConfigMap> = Api::default_namespaced(client(&server).await);
    let ssa = |m: &str| PatchParams::apply(m);
    let one = config_map("c", &[("app", "x")], &[("a", "1"), ("b", "1")]);
    let first = api.patch("c", &ssa("ctrl"), &Patch::Apply(&one)).await.unwrap();
    let again = api.patch("c", &ssa("ctrl"), &Patch::Apply(&one)).await.unwrap();
    assert_eq!(
        first.metadata.resource_version, again.metadata.resource_version,
        "a repeated apply is a no-op"
    );
    // Another manager changing a field the controller owns: a conflict, unless forced.
    let theirs = config_map("c", &[], &[("a", "2")]);
    let e = api
        .patch("c", &ssa("kubectl"), &Patch::Apply(&theirs))
        .await
        .unwrap_err();
    assert!(
        matches!(e, kube::Error::Api(ref s) if s.code == 409 && s.message.contains("data.a")),
        "{e}"
    );
    let forced = api
        .patch("c", &ssa("kubectl").force(), &Patch::Apply(&theirs))
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["a"], "2");
    // Dropping a field from the applied config removes it (if nobody else owns it).
    let fewer = config_map("c", &[("app", "x")], &[("b", "1")]);
    let now = api.patch("c", &ssa("ctrl"), &Patch::Apply(&fewer)).await.unwrap();
    assert_eq!(
        now.data.unwrap(),
        BTreeMap::from([
            ("a".to_string(), "2".to_string()),
            ("b".to_string(), "1".to_string())
        ]),
        "a is kubectl's now"
    );
}

#[tokio::test]
async fn status_is_its_own_subresource() {
    let server = MemoryApiServer::start().await.unwrap();
    let api: Api<Pod> = Api::default_namespaced(client(&server).await);
    let pod: Pod = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}),
    )
    .unwrap();
    api.patch("p", &PatchParams::apply("ctrl"), &Patch::Apply(&pod))
        .await
        .unwrap();
    let status = serde_json::json!({"status": {"phase": "Running"}, "spec": {"nodeName": "ignored"}});
    let after = api
        .patch_status("p", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().phase.as_deref(), Some("Running"));
    assert_eq!(
        after.spec.unwrap().node_name,
        None,
        "a status write cannot change the spec"
    );
    let main = serde_json::json!({"status": {"phase": "Failed"}, "metadata": {"labels": {"x": "y"}}});
    let after = api
        .patch("p", &PatchParams::default(), &Patch::Merge(&main))
        .await
        .unwrap();
    assert_eq!(
        after.status.unwrap().phase.as_deref(),
        Some("Running"),
        "a main write cannot change the status"
    );
    assert_eq!(after.metadata.labels.unwrap()["x"], "y");

    // One manager applying both: its status apply keeps the spec it applied, and its next spec apply the status.
    let status = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running"}});
    let after = api
        .patch_status("p", &PatchParams::apply("ctrl"), &Patch::Apply(&status))
        .await
        .unwrap();
    assert_eq!(after.spec.unwrap().containers[0].name, "c");
    let after = api
        .patch("p", &PatchParams::apply("ctrl"), &Patch::Apply(&pod))
        .await
        .unwrap();
    assert_eq!(after.status.unwrap().phase.as_deref(), Some("Running"));
}

#[tokio::test]
async fn watchers_see_changes_and_deleting_an_owner_deletes_its_dependents() {
    let server = MemoryApiServer::start().await.unwrap();
    let client = client(&server).await;
    let api: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let owner = api
        .create(&PostParams::default(), &config_map("owner", &[], &[]))
        .await
        .unwrap();
    let mut child = config_map("child", &[("role", "child")], &[]);
    child.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    let mut events = watcher(api.clone(), watcher::Config::default().labels("role=child")).boxed();
    api.create(&PostParams::default(), &child).await.unwrap();
    let mut saw_child = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        match event.unwrap() {
            watcher::Event::InitApply(c) | watcher::Event::Apply(c)
                if c.metadata.name.as_deref() == Some("child") =>
            {
                saw_child = true;
                break;
            }
            _ => {}
        }
    }
    assert!(saw_child, "the watcher saw the child");
    api.delete("owner", &DeleteParams::default()).await.unwrap();
    let mut deleted = false;
    while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        if let watcher::Event::Delete(c) = event.unwrap() {
            deleted = c.metadata.name.as_deref() == Some("child");
            break;
        }
    }
    assert!(
        deleted,
        "garbage collection deleted the child, and the watcher saw it"
    );
    assert!(api.list(&ListParams::default()).await.unwrap().items.is_empty());
}
