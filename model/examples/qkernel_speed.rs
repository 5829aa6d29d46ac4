//! Speed of the quantized decode kernels on SmolLM2-135M's shapes, for one block type
//! (`cargo run --release -p camelid-model --example qkernel_speed [q4_1|q4_0|q8_0|q4_k|q6_k] [rows]`, `rows` to
//! keep GGUF's row order rather than interleave as loading does where the CPU has the tiles): a whole model's
//! distinct matrices streamed from memory as decoding does (steps a second), one layer's matrices (hot in the
//! cache) and the LM head, at batches 1, 4 and 16. A measurement to read, not a test.

use std::time::Instant;

use anyhow::{Context, anyhow};
use camelid_model::cpu_gemv::qdot::prefers_interleaved;
use camelid_model::cpu_gemv::{DecodePool, with_decode_pool};
use camelid_model::interleave::interleave;
use camelid_model::quant::{GgmlType, Layout, QuantFormat};
use camelid_model::quantize::quantize;
use tch::Tensor;

/// One product of `w` (quantized `format` rows of `cols` values) with `batch` input rows.
fn product<'a>(
    pool: &DecodePool<'a>,
    w: &'a Tensor,
    format: QuantFormat,
    cols: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let input: Vec<f32> = (0..batch * cols).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    pool.products(&[(w, Some(format))], input, batch)
        .map(|_| ())
        .ok_or_else(|| anyhow!("the kernel declined a {format:?} matrix of {cols} columns"))
}

fn main() -> anyhow::Result<()> {
    let rows_order = std::env::args().nth(2).as_deref() == Some("rows");
    let ty = match std::env::args().nth(1).as_deref() {
        Some("q8_0") => GgmlType::Q8_0,
        Some("q4_0") => GgmlType::Q4_0,
        Some("q4_k") => GgmlType::Q4K,
        Some("q6_k") => GgmlType::Q6K,
        _ => GgmlType::Q4_1,
    };
    let format = QuantFormat {
        ty,
        layout: if prefers_interleaved(ty) && !rows_order {
            Layout::Interleaved
        } else {
            Layout::Rows
        },
    };
    // K-quants need rows of whole 256-value blocks: 512 stands in for SmolLM2's 576.
    let hidden = if matches!(ty, GgmlType::Q4K | GgmlType::Q6K) {
        512
    } else {
        576
    };
    let shapes = [(960, hidden), (3072, hidden), (hidden, 1536), (49152, hidden)];
    let matrices = shapes
        .iter()
        .map(|&(rows, cols)| {
            let values: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * 0.05)
                .collect();
            let mut bytes = quantize(ty, &values).map_err(|e| anyhow!(e))?;
            if format.layout == Layout::Interleaved {
                bytes = interleave(ty, &bytes, rows).context("whole groups of rows")?;
            }
            Ok((Tensor::from_slice(&bytes).reshape([rows as i64, -1]), cols))
        })
        .collect::<anyhow::Result<Vec<(Tensor, usize)>>>()?;
    // A whole model's worth of distinct matrices (30 layers and the head), streamed from memory as decoding does.
    let model: Vec<(Tensor, usize)> = (0..30)
        .flat_map(|_| matrices[..3].iter().map(|(t, c)| (t.copy(), *c)))
        .chain(std::iter::once((matrices[3].0.shallow_clone(), hidden)))
        .collect();
    let groups = [
        ("model", &model[..], 10),
        ("layer", &matrices[..3], 200),
        ("lm_head", &matrices[3..], 20),
    ];
    for batch in [1usize, 4, 16] {
        for (name, which, reps) in groups {
            let reps = (reps / batch).max(3);
            let bytes: usize = which.iter().map(|(t, _)| t.numel()).sum();
            let seconds = with_decode_pool(|pool| -> anyhow::Result<f64> {
                let run = || -> anyhow::Result<()> {
                    for (w, cols) in which {
                        product(pool, w, format, *cols, batch).context(name)?;
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
            println!(
                "{ty:?} {:?} batch {batch:>2} {name:>7}: {:8.1} us, {:5.1} GB/s of weights, {:6.1} passes/s",
                format.layout,
                seconds * 1e6,
                bytes as f64 / seconds / 1e9,
                1.0 / seconds
            );
        }
    }
    Ok(())
}
