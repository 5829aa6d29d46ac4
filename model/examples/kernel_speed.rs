//! GFLOP/s of the CPU decode kernel against libtorch's GEMM on SmolLM2's projection shapes, at several batch sizes
//! (`cargo run --release -p camelid-model --example kernel_speed`). A measurement to read, not a test.

use std::time::Instant;

use camelid_model::cpu_gemv::with_decode_pool;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let _guard = tch::no_grad_guard();
    let kind = match std::env::args().nth(1).as_deref() {
        Some("bf16") => Kind::BFloat16,
        _ => Kind::Float,
    };
    // q+k+v stacked, gate+up stacked, down: the shapes of one SmolLM2-135M layer; SHAPE=OUTxIN,... for others.
    let shapes: Vec<(i64, i64)> = match std::env::var("SHAPE").ok() {
        Some(s) => s
            .split(',')
            .map(|p| {
                let (o, i) = p
                    .split_once('x')
                    .ok_or_else(|| anyhow::anyhow!("SHAPE takes OUTxIN,..., not {p}"))?;
                Ok((o.parse()?, i.parse()?))
            })
            .collect::<anyhow::Result<_>>()?,
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
        let ours = with_decode_pool(|pool| -> anyhow::Result<f64> {
            let run = || -> anyhow::Result<()> {
                for (w, x) in weights.iter().zip(&inputs) {
                    let _ = pool
                        .linear_single_row(x, w, None)?
                        .ok_or_else(|| anyhow::anyhow!("the kernel declined {:?}", w.size()))?;
                }
                Ok(())
            };
            run()?;
            let t = Instant::now();
            for _ in 0..reps {
                run()?;
            }
            Ok(t.elapsed().as_secs_f64() / reps as f64)
        })?;
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
    Ok(())
}
