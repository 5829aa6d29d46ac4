//! End to end on a real cluster: runs only when `KUBECONFIG` points at one (and says clearly that it was skipped
//! otherwise). It installs the CRDs, runs the operator in-process, applies a tiny CPU FineTuneJob (one worker, two
//! steps) and waits for it to succeed. The cluster must be able to pull `CAMELID_E2E_TRAINER_IMAGE` and bind
//! `CAMELID_E2E_CLAIM` (a ReadWriteMany PersistentVolumeClaim in `CAMELID_E2E_NAMESPACE`, default `default`)
//! holding `model.gguf` and `data.jsonl`. With `CAMELID_E2E_WORKER_IMAGE` set, the job's ChatModel then serves the
//! exported model: the test waits until its worker is ready (`1/1`, phase `Ready`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use camelid_crds::FineTuneJob;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Says why the suite did not run, on the real stderr (not the test harness's captured output), so that it shows
/// in `make test` logs.
fn skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED cluster e2e: {why}");
}

#[tokio::test]
async fn a_tiny_finetunejob_succeeds_on_a_real_cluster() {
    if std::env::var_os("KUBECONFIG").is_none() {
        return skip("KUBECONFIG is not set; no Kubernetes cluster is reachable from this machine");
    }
    let (Ok(image), Ok(claim)) = (
        std::env::var("CAMELID_E2E_TRAINER_IMAGE"),
        std::env::var("CAMELID_E2E_CLAIM"),
    ) else {
        return skip(
            "set CAMELID_E2E_TRAINER_IMAGE and CAMELID_E2E_CLAIM (a claim holding model.gguf and data.jsonl)",
        );
    };
    let ns = std::env::var("CAMELID_E2E_NAMESPACE").unwrap_or_else(|_| "default".into());
    let client = Client::try_default().await.expect("a client from KUBECONFIG");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in camelid_crds::crds() {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("camelid-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let args = camelid_operator::run::RunArgs {
        namespace: ns.clone(),
        gpu_prices: None,
        trainer_image: image,
        worker_image: std::env::var("CAMELID_E2E_WORKER_IMAGE")
            .unwrap_or_else(|_| "camelid-worker:e2e".into()),
        autoscale_seconds: 5,
        termination_grace_seconds: 60,
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        health_addr: "127.0.0.1:0".parse().unwrap(),
        leader_election: false,
        progress_poll_seconds: 5,
        ..camelid_operator::run::RunArgs::default()
    };
    let operator = tokio::spawn(camelid_operator::run::run(args, client.clone()));
    let name = format!("e2e-{}", std::process::id());
    let job: FineTuneJob = serde_json::from_value(json!({
        "apiVersion": "camelid.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name, "namespace": ns},
        "spec": {"baseModel": {"claimName": claim, "path": "model.gguf"},
                 "dataset": {"claimName": claim, "path": "data.jsonl"},
                 "hyperparameters": {"maxSteps": 2, "globalBatch": 2, "microBatch": 2, "maxLength": 128},
                 "workers": 1, "gpusPerWorker": 0, "spot": {"preferSpot": false},
                 "checkpoints": {"claimName": claim}, "output": {"claimName": claim, "chatModel": name}}})).unwrap();
    let api: Api<FineTuneJob> = Api::namespaced(client.clone(), &ns);
    api.patch(&name, &PatchParams::apply("camelid-e2e"), &Patch::Apply(&job))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1800);
    let phase = loop {
        let status = api.get(&name).await.unwrap().status.unwrap_or_default();
        match status.phase.map(|p| format!("{p:?}")) {
            Some(p) if p == "Succeeded" || p == "Failed" => break (p, status.message),
            _ => {}
        }
        assert!(Instant::now() < deadline, "not finished after 30 minutes");
        tokio::time::sleep(Duration::from_secs(10)).await;
    };
    assert_eq!(phase.0, "Succeeded", "{:?}", phase.1);
    if std::env::var_os("CAMELID_E2E_WORKER_IMAGE").is_none() {
        operator.abort();
        return skip("the serving half: set CAMELID_E2E_WORKER_IMAGE to serve the exported model");
    }
    let models: Api<camelid_crds::ChatModel> = Api::namespaced(client, &ns);
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let status = models
            .get(&name)
            .await
            .ok()
            .and_then(|m| m.status)
            .unwrap_or_default();
        if status.ready.as_deref() == Some("1/1")
            && status.phase.map(|p| format!("{p:?}")).as_deref() == Some("Ready")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ChatModel is not ready after 15 minutes: {status:?}"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    operator.abort();
}
