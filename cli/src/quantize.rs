//! `camelid quantize`: an HF directory (or a GGUF file) written as a GGUF file of quantized blocks.

use std::path::PathBuf;

use anyhow::Context;
use camelid_model::gguf_export::write_quantized_gguf;
use camelid_model::quant::GgmlType;
use camelid_model::{LoadOptions, ModelError};
use clap::{Args, ValueEnum};

use crate::Failure;

/// The block types `camelid quantize` writes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum QuantType {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
    #[value(name = "q4_1")]
    Q4_1,
    #[value(name = "q4_k")]
    Q4K,
    #[value(name = "q6_k")]
    Q6K,
}

impl QuantType {
    fn ggml(self) -> GgmlType {
        match self {
            QuantType::Q8_0 => GgmlType::Q8_0,
            QuantType::Q4_0 => GgmlType::Q4_0,
            QuantType::Q4_1 => GgmlType::Q4_1,
            QuantType::Q4K => GgmlType::Q4K,
            QuantType::Q6K => GgmlType::Q6K,
        }
    }
}

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The model to quantize: an HF directory (a fine-tune the trainer exported) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The block type of the matrices (norms stay f32; K-quants fall back to 32-value blocks for rows that are
    /// not whole 256-value blocks).
    #[arg(long = "type", value_enum)]
    pub ty: QuantType,
    /// The GGUF file to write.
    #[arg(long)]
    pub output: PathBuf,
}

pub fn run(args: &QuantizeArgs) -> Result<(), Failure> {
    if args.output.extension().is_none_or(|e| e != "gguf") {
        return Err(crate::user_error(anyhow::anyhow!(
            "--output {}: the file name must end in .gguf",
            args.output.display()
        )));
    }
    let loaded = camelid_model::load(&args.model, LoadOptions::default())
        .with_context(|| format!("loading {}", args.model.display()))
        .map_err(|error| Failure { error, code: 2 })?;
    let report = write_quantized_gguf(&loaded, args.ty.ggml(), &args.output).map_err(|e: ModelError| {
        let code = if e.is_user_error() { 2 } else { 1 };
        Failure {
            error: anyhow::Error::new(e).context(format!("writing {}", args.output.display())),
            code,
        }
    })?;
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for (_, ty) in &report.tensors {
        *counts.entry(format!("{ty:?}")).or_default() += 1;
    }
    println!(
        "wrote {} ({:.1} MB): {}",
        args.output.display(),
        report.bytes as f64 / 1e6,
        counts
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
