//! Exact resume on CPU: a run stopped at any point (`--stop-at-step`, SIGTERM mid-step, SIGKILL) and resumed with
//! `--resume auto` gives bitwise the same per-step losses, learning rates, gradient norms and final weights as a
//! straight run. Also: corrupt checkpoints are skipped with a reason, and a changed config is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

const STEPS: &str = "24";

fn straight_run(name: &str) -> std::path::PathBuf {
    let dir = scratch(name);
    write_dataset(&dir.join("data.json"), 30);
    let out = dir.join("out");
    let run = train_command(
        &dir.join("data.json"),
        &out,
        &["--max-steps", STEPS, "--resume", "never"],
    )
    .output()
    .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    out
}

fn assert_same_run(straight: &Path, resumed: &Path) {
    let (a, b) = (step_log(straight), step_log(resumed));
    assert_eq!(a.len(), STEPS.parse::<usize>().unwrap());
    // Bitwise: serde_json prints the shortest text that round-trips each f64.
    assert_eq!(a, b, "per-step loss, lr and grad norm must be identical");
    let wa = std::fs::read(straight.join("model.safetensors")).unwrap();
    let wb = std::fs::read(resumed.join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights must be bitwise identical");
}

fn progress(port: u16) -> Option<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /progress HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
}

/// Starts a run with a progress server and waits until it has finished `step` steps.
#[allow(clippy::zombie_processes)] // the caller waits; a panic here fails the test and the child dies with it
fn start_and_wait(data: &Path, out: &Path, step: u64) -> (Child, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = train_command(data, out, &["--max-steps", STEPS, "--progress-addr", &addr])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(p) = progress(port)
            && p["step"].as_u64().unwrap() >= step
        {
            assert_eq!(p["total_steps"], 24);
            assert!(p["loss"].as_f64().unwrap() > 0.0);
            return (child, port);
        }
        assert!(Instant::now() < deadline, "the run never reached step {step}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn resume(data: &Path, out: &Path) -> String {
    let run = train_command(data, out, &["--max-steps", STEPS, "--resume", "auto"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    stderr(&run)
}

#[test]
fn stop_at_step_then_resume_equals_a_straight_run() {
    let straight = straight_run("straight-a");
    let dir = scratch("stop-at-step");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let out = dir.join("out");
    let stop = train_command(&data, &out, &["--max-steps", STEPS, "--stop-at-step", "7"])
        .output()
        .unwrap();
    assert_eq!(stop.status.code(), Some(75), "{}", stderr(&stop));
    assert!(out.join("checkpoints/step-00000007/manifest.json").exists());
    assert!(!out.join("model.safetensors.tmp").exists());
    let log = resume(&data, &out);
    assert!(log.contains("resuming") && log.contains("step-00000007"), "{log}");
    assert_same_run(&straight, &out);
}

#[test]
fn bf16_mixed_precision_trains_and_resumes_exactly() {
    // The GPU path on CPU: a bf16 copy computes, f32 masters are updated and copied back, and a resumed run
    // refreshes the copy from the checkpoint's masters.
    let dir = scratch("bf16");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let flags = ["--max-steps", "8", "--precision", "bf16"];
    let straight = dir.join("straight");
    let run = train_command(&data, &straight, &[&flags[..], &["--resume", "never"]].concat())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let log = step_log(&straight);
    assert!(log[7].1 < log[0].1 - 0.5, "bf16 training did not learn: {log:?}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32", "the f32 masters are exported");

    let resumed = dir.join("resumed");
    let stop = train_command(&data, &resumed, &[&flags[..], &["--stop-at-step", "3"]].concat())
        .output()
        .unwrap();
    assert_eq!(stop.status.code(), Some(75), "{}", stderr(&stop));
    let run = train_command(&data, &resumed, &flags).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(step_log(&straight), step_log(&resumed));
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap()
            == std::fs::read(resumed.join("model.safetensors")).unwrap()
    );
}

#[test]
fn sigterm_mid_run_and_sigkill_then_resume_equal_a_straight_run() {
    let straight = straight_run("straight-b");
    let dir = scratch("signals");
    let data = dir.join("data.json");
    write_dataset(&data, 30);

    // SIGTERM: finish the micro-batch in flight, checkpoint (possibly mid-step), exit 75.
    let term_out = dir.join("term");
    let (child, _) = start_and_wait(&data, &term_out, 5);
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let stopped = child.wait_with_output().unwrap();
    assert_eq!(stopped.status.code(), Some(75), "{}", stderr(&stopped));
    assert!(
        stderr(&stopped).contains("stopped after a complete checkpoint"),
        "{}",
        stderr(&stopped)
    );
    resume(&data, &term_out);
    assert_same_run(&straight, &term_out);

    // SIGKILL: no warning; resume from the last periodic checkpoint and redo the steps after it.
    #[allow(clippy::zombie_processes)]
    let kill_out = dir.join("kill");
    let (mut child, _) = {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = train_command(
            &data,
            &kill_out,
            &[
                "--max-steps",
                STEPS,
                "--checkpoint-interval-steps",
                "4",
                "--progress-addr",
                &addr,
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while progress(port).is_none_or(|p| p["last_checkpoint"]["step"].as_u64().unwrap_or(0) < 8) {
            assert!(Instant::now() < deadline, "no checkpoint at step 8");
            std::thread::sleep(Duration::from_millis(5));
        }
        (child, port)
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    resume(&data, &kill_out);
    assert_same_run(&straight, &kill_out);
}

fn corrupt(path: &Path, how: &str) {
    match how {
        "truncate" => camelid_test_support::truncate_half(path),
        "flip" => {
            let mut bytes = std::fs::read(path).unwrap();
            let i = bytes.len() - 10;
            bytes[i] ^= 0x55;
            std::fs::write(path, bytes).unwrap();
        }
        "remove" => std::fs::remove_file(path).unwrap(),
        _ => unreachable!(),
    }
}

#[test]
fn corrupt_checkpoints_are_skipped_with_the_reason() {
    let dir = scratch("corrupt");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let out = dir.join("out");
    let flags = [
        "--max-steps",
        "4",
        "--checkpoint-interval-steps",
        "1",
        "--checkpoint-keep",
        "10",
        "--stop-at-step",
        "4",
    ];
    let run = train_command(&data, &out, &flags).output().unwrap();
    assert_eq!(run.status.code(), Some(75), "{}", stderr(&run));
    let ckpt = |s: u64| out.join(format!("checkpoints/step-{s:08}"));
    corrupt(&ckpt(4).join("model.safetensors"), "truncate");
    corrupt(&ckpt(3).join("manifest.json"), "remove");
    corrupt(&ckpt(2).join("optimizer.safetensors"), "flip");
    // A half-written checkpoint from a killed writer.
    std::fs::create_dir_all(out.join("checkpoints/.tmp-step-00000005-1")).unwrap();

    let explicit = train_command(&data, &out, &["--max-steps", "4", "--resume"])
        .arg(ckpt(4))
        .output()
        .unwrap();
    assert_eq!(explicit.status.code(), Some(2), "{}", stderr(&explicit));
    assert!(stderr(&explicit).contains("truncated"), "{}", stderr(&explicit));

    let auto = train_command(&data, &out, &["--max-steps", "4"])
        .output()
        .unwrap();
    assert!(auto.status.success(), "{}", stderr(&auto));
    let log = stderr(&auto);
    for reason in [
        "step-00000004 is incomplete or corrupt: model.safetensors has",
        "step-00000003 is incomplete or corrupt: no manifest.json",
        "step-00000002 is incomplete or corrupt: optimizer.safetensors does not match its SHA-256",
    ] {
        assert!(log.contains(reason), "missing {reason:?} in\n{log}");
    }
    assert!(log.contains("resuming") && log.contains("step-00000001"), "{log}");
}

#[test]
fn resuming_with_different_settings_is_refused_and_names_them() {
    let dir = scratch("mismatch");
    let data = dir.join("data.json");
    write_dataset(&data, 30);
    let out = dir.join("out");
    let run = train_command(&data, &out, &["--max-steps", "4", "--stop-at-step", "1"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(75), "{}", stderr(&run));
    let changed = train_command(&data, &out, &["--max-steps", "4", "--learning-rate", "5e-4"])
        .output()
        .unwrap();
    assert_eq!(changed.status.code(), Some(2), "{}", stderr(&changed));
    assert!(
        stderr(&changed).contains("lr: checkpoint 0.001, now 0.0005"),
        "{}",
        stderr(&changed)
    );
}

#[test]
fn bad_data_stops_with_the_file_and_line() {
    let dir = scratch("bad-data");
    let cases = [
        (
            "invalid.jsonl",
            "{\"messages\": []}\n{\"messages\": [\n",
            "invalid.jsonl:2",
        ),
        (
            "schema.jsonl",
            "{\"messages\": []}\n\n{\"text\": \"hello\"}\n",
            "schema.jsonl:3: not a conversation",
        ),
        ("empty.json", "", "holds no conversations"),
    ];
    for (name, text, expected) in cases {
        let data = dir.join(name);
        std::fs::write(&data, text).unwrap();
        let run = train_command(&data, &dir.join("out"), &["--max-steps", "1"])
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(2), "{name}: {}", stderr(&run));
        assert!(stderr(&run).contains(expected), "{name}: {}", stderr(&run));
    }
    let missing = train_command(&dir.join("nope.json"), &dir.join("out"), &[])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("nope.json"), "{}", stderr(&missing));
}
