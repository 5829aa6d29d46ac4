//! GFLOP/s of the CPU decode kernel against libtorch's GEMM on SmolLM2's projection shapes, at several batch sizes
//! (`cargo run --release -p camelid-model --example kernel_speed`). A measurement to read, not a test.

use std::time::Instant;

use camelid_model::cpu_gemv::with_decode_pool;
use tch::{Device, Kind, Tensor};

fn main() {
    let _guard = tch::no_grad_guard();
    let kind = match std::env::args().nth(1).as_deref() {
        Some("bf16") => Kind::BFloat16,
        _ => Kind::Float,
    };
    // q+k+v stacked, gate+up stacked, down: the shapes of one SmolLM2-135M layer.
    let shapes: Vec<(i64, i64)> = match std::env::var("SHAPE").ok() {
        Some(s) => s
            .split(',')
            .map(|p| {
                let (o, i) = p.split_once('x').expect("SHAPE=OUTxIN,...");
                (o.parse().expect("out"), i.parse().expect("in"))
            })
            .collect(),
        None => vec![(960, 576), (3072, 576), (576, 1536)],
    };
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|&(o, i)| Tensor::randn([o, i], (Kind::Float, Device::Cpu)).to_kind(kind))
        .collect();
    for batch in [1i64, 4, 16, 64] {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .map(|&(_, i)| Tensor::randn([batch, i], (Kind::Float, Device::Cpu)).to_kind(kind))
            .collect();
        let flops: f64 = shapes
            .iter()
            .map(|&(o, i)| 2.0 * (o * i) as f64 * batch as f64)
            .sum();
        let reps = (400 / batch).max(10);
        let ours = with_decode_pool(|pool| {
            let run = || {
                for (w, x) in weights.iter().zip(&inputs) {
                    let _ = pool
                        .linear_single_row(x, w, None)
                        .unwrap()
                        .expect("kernel applies");
                }
            };
            run();
            let t = Instant::now();
            for _ in 0..reps {
                run();
            }
            t.elapsed().as_secs_f64() / reps as f64
        });
        let torch = {
            let run = || {
                for (w, x) in weights.iter().zip(&inputs) {
                    let _ = x.linear::<&Tensor>(w, None);
                }
            };
            run();
            let t = Instant::now();
            for _ in 0..reps {
                run();
            }
            t.elapsed().as_secs_f64() / reps as f64
        };
        println!(
            "{kind:?} batch {batch:>3}: kernel {:6.1} GFLOP/s, libtorch {:6.1} GFLOP/s",
            flops / ours / 1e9,
            flops / torch / 1e9
        );
    }
}
