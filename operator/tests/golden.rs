//! `examples/finetunejob.yaml` → the exact children of its first (spot) attempt and of an on-demand attempt, as
//! YAML snapshots in `tests/golden/`. `UPDATE_GOLDEN=1 cargo test -p camelid-operator --test golden` rewrites
//! them; review the diff like code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use camelid_crds::FineTuneJob;
use camelid_operator::error::BuildError;
use camelid_operator::finetunejob::build::{Attempt, children, grad_accum};
use camelid_operator::placement::Capacity;
use camelid_operator::settings::Settings;

fn example() -> FineTuneJob {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/finetunejob.yaml");
    let mut job: FineTuneJob = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    job.metadata.uid = Some("2c8e1b0a-5f0e-4b8e-9a51-0c1d2e3f4a5b".into());
    job
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == actual,
        "{} differs (UPDATE_GOLDEN=1 rewrites it):\n{actual}",
        path.display()
    );
}

fn yaml(children: &camelid_operator::finetunejob::build::Children) -> String {
    format!(
        "{}---\n{}",
        serde_yaml_ng::to_string(&children.service).unwrap(),
        serde_yaml_ng::to_string(&children.job).unwrap()
    )
}

#[test]
fn the_example_builds_exactly_these_children() {
    let job = example();
    assert_eq!(
        grad_accum(&job),
        4,
        "128 = 2 workers x 4 GPUs x micro-batch 4 x 4 steps"
    );
    let settings = Settings::default();
    let spot = children(
        &job,
        Attempt {
            number: 1,
            capacity: Capacity::Spot,
        },
        &settings,
    )
    .unwrap();
    golden("finetunejob-attempt1-spot.yaml", &yaml(&spot));
    let on_demand = children(
        &job,
        Attempt {
            number: 4,
            capacity: Capacity::OnDemand,
        },
        &settings,
    )
    .unwrap();
    golden("finetunejob-attempt4-on-demand.yaml", &yaml(&on_demand));
    // Building is pure: the same inputs give the same objects.
    assert_eq!(
        spot,
        children(
            &job,
            Attempt {
                number: 1,
                capacity: Capacity::Spot
            },
            &settings
        )
        .unwrap()
    );
}

#[test]
fn children_need_an_owner() {
    let mut job = example();
    job.metadata.uid = None;
    let e = children(
        &job,
        Attempt {
            number: 1,
            capacity: Capacity::Spot,
        },
        &Settings::default(),
    )
    .unwrap_err();
    assert_eq!(e, BuildError::NoOwner);
}
