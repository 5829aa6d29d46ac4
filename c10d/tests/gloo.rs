//! Two real processes (this test binary, started again as each rank) meet through libtorch's TCPStore and run
//! c10d's Gloo collectives on tch tensors; and a rank that dies makes the survivor's next collective fail with an
//! error instead of hanging.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use camelid_c10d::{DistError, ProcessGroup};
use camelid_test_support::free_port;
use tch::{Kind, Tensor};

/// Runs `test` as ranks 0 and 1 in two child processes; returns their exit statuses and outputs.
fn run_ranks(test: &str, port: u16) -> Vec<(bool, String)> {
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env("CAMELID_DIST_TEST_RANK", rank.to_string())
                .env("CAMELID_DIST_TEST_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), text)
        })
        .collect()
}

/// This process's rank and port when it is a child.
fn as_rank() -> Option<(usize, u16)> {
    let rank = std::env::var("CAMELID_DIST_TEST_RANK").ok()?.parse().ok()?;
    let port = std::env::var("CAMELID_DIST_TEST_PORT").ok()?.parse().ok()?;
    Some((rank, port))
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn two_ranks_reduce_broadcast_gather_and_scatter() {
    let Some((rank, port)) = as_rank() else {
        let results = run_ranks("two_ranks_reduce_broadcast_gather_and_scatter", free_port());
        for (rank, (ok, out)) in results.iter().enumerate() {
            assert!(ok, "rank {rank} failed:\n{out}");
            assert!(out.contains(&format!("rank {rank} ok")), "{out}");
        }
        return;
    };
    let pg = ProcessGroup::gloo("127.0.0.1", port, rank, 2, Duration::from_secs(30)).unwrap();
    let r = rank as f32;
    // All-reduce: (1 + r) summed over ranks 0 and 1.
    let mut t = Tensor::from_slice(&[1.0 + r, 10.0 * (1.0 + r)]);
    pg.all_reduce_sum(&mut t).unwrap();
    assert_eq!(values(&t), [3.0, 30.0]);
    // Broadcast from rank 1.
    let mut b = Tensor::from_slice(&[r, r]);
    pg.broadcast(&mut b, 1).unwrap();
    assert_eq!(values(&b), [1.0, 1.0]);
    // All-gather into one tensor, in rank order.
    let input = Tensor::from_slice(&[r, r + 0.5]);
    let mut out = Tensor::zeros([4], (Kind::Float, tch::Device::Cpu));
    pg.all_gather_into(&mut out, &input).unwrap();
    assert_eq!(values(&out), [0.0, 0.5, 1.0, 1.5]);
    // Started in the background, overlapping another collective issued meanwhile, then waited for.
    let input = Tensor::from_slice(&[10.0 + r]);
    let gathered = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    let pending = pg.all_gather_start(&gathered, &input).unwrap();
    let mut meanwhile = Tensor::from_slice(&[r]);
    pg.all_reduce_sum(&mut meanwhile).unwrap();
    pending.wait().unwrap();
    assert_eq!(values(&gathered), [10.0, 11.0]);
    assert_eq!(values(&meanwhile), [1.0]);
    // Reduce-scatter: the sum of [0,1,2,3] + 10r over ranks is [10,12,14,16]; rank r keeps its half.
    let input = Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0]) + 10.0 * f64::from(r);
    let mut half = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    pg.reduce_scatter_sum(&mut half, &input).unwrap();
    assert_eq!(values(&half), if rank == 0 { [10.0, 12.0] } else { [14.0, 16.0] });
    // The same reduce-scatter, started in the background and waited for later.
    let later = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    let pending = pg.reduce_scatter_start(&later, &input).unwrap();
    pending.wait().unwrap();
    assert_eq!(values(&later), values(&half));
    pg.barrier().unwrap();
    println!("rank {rank} ok");
}

#[test]
fn a_dead_rank_makes_the_other_fail_instead_of_hanging() {
    let Some((rank, port)) = as_rank() else {
        let results = run_ranks("a_dead_rank_makes_the_other_fail_instead_of_hanging", free_port());
        let (ok, out) = &results[0];
        assert!(ok, "rank 0 failed:\n{out}");
        assert!(out.contains("rank 0 saw the failure"), "{out}");
        return;
    };
    let pg = ProcessGroup::gloo("127.0.0.1", port, rank, 2, Duration::from_secs(60)).unwrap();
    pg.barrier().unwrap();
    if rank == 1 {
        // Gone without a word, as a preempted pod.
        std::process::exit(0);
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut t = Tensor::from_slice(&[1.0f32]);
    let e = pg.all_reduce_sum(&mut t).unwrap_err();
    assert!(
        matches!(
            e,
            DistError::Collective {
                op: "all_reduce",
                rank: 0,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.category(), "collective");
    // Well within the collective timeout (60 s): it must not hang.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    println!("rank 0 saw the failure after {:?}: {e}", started.elapsed());
    // Giving up on a collective still in flight and on the group returns at once instead of waiting for the
    // collective timeout (c10d's destructor would wait for it).
    let gathered = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu));
    let pending = pg.all_gather_start(&gathered, &t);
    let dropping = Instant::now();
    drop(pending);
    drop(pg);
    assert!(
        dropping.elapsed() < Duration::from_secs(5),
        "dropping took {:?}",
        dropping.elapsed()
    );
}

#[test]
fn a_rank_outside_the_world_is_refused() {
    let e = ProcessGroup::gloo("127.0.0.1", 1, 2, 2, Duration::from_secs(1)).unwrap_err();
    assert_eq!(e.category(), "invalid");
    assert!(e.to_string().contains("rank 2 is not in a world of 2"), "{e}");
}

#[test]
fn nccl_runs_on_a_gpu_and_is_refused_clearly_elsewhere() {
    let result = ProcessGroup::nccl("127.0.0.1", free_port(), 0, 1, Duration::from_secs(30), 0);
    match (ProcessGroup::has_nccl(), tch::Cuda::is_available()) {
        (true, true) => {
            // A world of one on GPU 0: the collectives run through NCCL on CUDA tensors.
            let pg = result.unwrap();
            assert_eq!(pg.device(), tch::Device::Cuda(0));
            let mut t = Tensor::from_slice(&[2.0f32, 3.0]).to_device(pg.device());
            pg.all_reduce_sum(&mut t).unwrap();
            assert_eq!(values(&t.to_device(tch::Device::Cpu)), [2.0, 3.0]);
            pg.barrier().unwrap();
        }
        (true, false) => {
            let e = result.unwrap_err();
            assert_eq!(e.category(), "rendezvous", "{e}");
        }
        (false, _) => {
            let e = result.unwrap_err();
            assert!(e.to_string().contains("--features nccl"), "{e}");
            assert_eq!(e.category(), "invalid");
        }
    }
}
