//! The step loop, the longest phase of a run: each step's micro-batches in rounds over the ranks, the optimizer
//! update, the step's record (in `metrics.jsonl`, the metrics and `/progress`), and the checkpoint when one is due
//! or a stop was asked for (between two steps, or mid-step between two rounds).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use tch::Tensor;

use super::run::{Position, Run};
use crate::error::TrainError;
use crate::optim::cosine_lr;
use crate::progress::Phase;

/// One line per step in `metrics.jsonl` (kept in step order across resumes).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    /// Tokens the step computed, padding included (equal to `tokens` when packed). Absent (0) in the lines of
    /// trainers older than packing, which a resume keeps.
    #[serde(default)]
    pub computed_tokens: usize,
    pub trainable_tokens: u64,
    pub epoch: f64,
    pub seconds: f64,
    /// Seconds this rank spent in collectives during the step (several ranks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm_seconds: Option<f64>,
}

/// How the step loop ended.
pub(super) enum LoopEnd {
    /// Every step ran; `steps` is the number of steps done.
    Done { steps: u64 },
    /// A stop was asked for (a signal on any rank, or `--stop-at-step`) and a complete checkpoint written.
    Stopped { step: u64, checkpoint: PathBuf },
}

/// What a step's micro-batches left for the update: this rank's summed loss (on the device), its tokens, and the
/// trainable tokens of the whole step.
struct Accumulated {
    loss_sum: Tensor,
    tokens: usize,
    computed: usize,
    trainable: u64,
}

/// Runs the steps from `start` to the last one, checkpointing on schedule and stopping when asked.
pub(super) fn train_steps(run: &mut Run<'_>, start: Position) -> Result<LoopEnd, TrainError> {
    let mut log = StepLog::start(run, start.step)?;
    let Position {
        mut step,
        mut micro,
        mut partial,
    } = start;
    while step < run.total_steps {
        let started = Instant::now();
        let accumulated = match accumulate(run, step, micro, partial)? {
            ControlFlow::Continue(accumulated) => accumulated,
            ControlFlow::Break(stopped) => return Ok(stopped),
        };
        let record = update(run, step, accumulated, started)?;
        step += 1;
        micro = 0;
        partial = (0.0, 0);
        log.report(run, &record)?;
        if let Some(stopped) = checkpoint_if_due(run, step)? {
            return Ok(stopped);
        }
    }
    Ok(LoopEnd::Done { steps: step })
}

/// Forward and backward of step `step`'s micro-batches from `micro` on (with `partial` carried over from a
/// checkpoint), in rounds: in each, every rank takes one micro-batch (the last round of a step may leave some
/// without). After each round the ranks agree whether any was asked to stop; if so, and the step is not done, they
/// checkpoint mid-step and the loop ends ([`ControlFlow::Break`]).
fn accumulate(
    run: &mut Run<'_>,
    step: u64,
    mut micro: u64,
    mut partial: (f64, u64),
) -> Result<ControlFlow<LoopEnd, Accumulated>, TrainError> {
    let opts = run.opts;
    let (rank, world) = (run.comm.rank() as u64, run.comm.world() as u64);
    let range = run.step_range(step);
    let scale = 1.0 / run.trainable_at(range.clone()).max(1) as f64;
    let (mut tokens, mut computed) = (0, 0);
    // The step's summed loss stays on the device until the step ends (no host sync per micro-batch).
    let mut loss_sum = Tensor::f_from_slice(&[partial.0])?
        .f_to_device(run.model.model.device())?
        .f_squeeze()?;
    let mut position = range.start + micro;
    while position < range.end {
        let mine = position + rank;
        let batch = if mine < range.end {
            Some(run.micro_batch_at(mine)?)
        } else {
            None
        };
        let loss = run
            .engine
            .micro_step(&mut run.model.model, batch.as_ref(), scale)?;
        loss_sum = loss_sum.f_add(&loss)?;
        tokens += batch.as_ref().map_or(0, |b| b.tokens);
        computed += batch.as_ref().map_or(0, |b| b.input.numel());
        let next = (position + world).min(range.end);
        partial.1 += run.trainable_at(position..next);
        micro = next - range.start;
        position = next;
        let stop = run.comm.any(opts.stop_requested.load(Ordering::SeqCst))?;
        if stop && position < range.end {
            tracing::warn!(step, micro_step = micro, "stop requested: checkpointing mid-step");
            partial.0 = run.comm.sum(&[f64::try_from(&loss_sum)?])?[0];
            let checkpoint = run.save(step, micro, partial)?;
            opts.reporter.update(|p| p.phase = Phase::Stopped);
            return Ok(ControlFlow::Break(LoopEnd::Stopped { step, checkpoint }));
        }
    }
    Ok(ControlFlow::Continue(Accumulated {
        loss_sum,
        tokens,
        computed,
        trainable: partial.1,
    }))
}

/// Ends step `step` (counted from 0): clips the gradients, applies AdamW at the scheduled learning rate, and sums
/// the loss and tokens over the ranks into the step's record.
fn update(
    run: &mut Run<'_>,
    step: u64,
    accumulated: Accumulated,
    started: Instant,
) -> Result<StepRecord, TrainError> {
    let cfg = run.cfg;
    let update_started = Instant::now();
    let grad_norm = run.engine.clip_grad_norm(cfg.max_grad_norm)?;
    let lr = cosine_lr(cfg.learning_rate, step, run.total_steps, cfg.warmup_ratio);
    run.optimizer.step(run.engine.masters(), run.engine.grads(), lr)?;
    run.engine.finish_step(&run.model.model)?;
    tracing::debug!(
        seconds = update_started.elapsed().as_secs_f64(),
        "clip and optimizer update"
    );
    let Accumulated {
        loss_sum,
        tokens,
        computed,
        trainable,
    } = accumulated;
    let sums = run
        .comm
        .sum(&[f64::try_from(&loss_sum)?, tokens as f64, computed as f64])?;
    let (loss_total, tokens, computed_tokens) = (sums[0], sums[1] as usize, sums[2] as usize);
    let per_epoch = run.batcher.batches_per_epoch() as u64;
    Ok(StepRecord {
        step: step + 1,
        loss: loss_total / trainable.max(1) as f64,
        learning_rate: lr,
        grad_norm,
        tokens,
        computed_tokens,
        trainable_tokens: trainable,
        epoch: run.step_range(step).end as f64 / per_epoch as f64,
        seconds: started.elapsed().as_secs_f64(),
        comm_seconds: run.engine.take_comm_time().map(|d| d.as_secs_f64()),
    })
}

/// After step `step` (counted from 1): checkpoints when the interval or the last step says so, or when a stop was
/// asked for (on any rank, or by `--stop-at-step`), in which case the loop ends.
fn checkpoint_if_due(run: &mut Run<'_>, step: u64) -> Result<Option<LoopEnd>, TrainError> {
    let (cfg, opts) = (run.cfg, run.opts);
    let stop = run.comm.any(opts.stop_requested.load(Ordering::SeqCst))? || opts.stop_at_step == Some(step);
    // The final step is checkpointed too (an export cut short resumes from it), unless no checkpoint is to be
    // kept after the export anyway.
    let last = step == run.total_steps && cfg.checkpoint_keep > 0;
    if stop || step.is_multiple_of(cfg.checkpoint_interval_steps) || last {
        let checkpoint = run.save(step, 0, (0.0, 0))?;
        if stop {
            opts.reporter.update(|p| p.phase = Phase::Stopped);
            return Ok(Some(LoopEnd::Stopped { step, checkpoint }));
        }
    }
    Ok(None)
}

/// Where each step is reported: `metrics.jsonl` (rank 0), the Prometheus metrics, `/progress` and the log line,
/// with the smoothed step time behind the ETA.
struct StepLog {
    file: Option<std::fs::File>,
    path: PathBuf,
    tty: bool,
    mean_step_seconds: Option<f64>,
}

impl StepLog {
    /// Reports the run as training from step `step` on and opens the metrics log there (rank 0).
    fn start(run: &Run<'_>, step: u64) -> Result<Self, TrainError> {
        let opts = run.opts;
        let metrics = &opts.reporter.metrics;
        metrics.total_steps.set(run.total_steps as i64);
        metrics.step.set(step as i64);
        opts.reporter.update(|p| {
            p.phase = Phase::Training;
            p.step = step;
            p.total_steps = run.total_steps;
        });
        let path = run.output.join("metrics.jsonl");
        let file = if run.comm.is_leader() {
            Some(open_step_log(&path, step)?)
        } else {
            None
        };
        Ok(StepLog {
            file,
            path,
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            mean_step_seconds: None,
        })
    }

    /// Reports the step `record` describes, everywhere.
    fn report(&mut self, run: &Run<'_>, record: &StepRecord) -> Result<(), TrainError> {
        let (step, total_steps) = (record.step, run.total_steps);
        let (loss, lr, grad_norm) = (record.loss, record.learning_rate, record.grad_norm);
        let seconds = record.seconds.max(1e-9);
        let mean = self
            .mean_step_seconds
            .map_or(seconds, |m| 0.8 * m + 0.2 * seconds);
        self.mean_step_seconds = Some(mean);
        let tokens_per_second = record.tokens as f64 / seconds;
        let eta = mean * (total_steps - step) as f64;
        if let (Some(log), Ok(line)) = (self.file.as_mut(), serde_json::to_string(record)) {
            std::io::Write::write_all(log, format!("{line}\n").as_bytes()).map_err(|e| TrainError::Io {
                path: self.path.clone(),
                source: e,
            })?;
        }
        let metrics = &run.opts.reporter.metrics;
        metrics.step.set(step as i64);
        metrics.loss.set(loss);
        metrics.learning_rate.set(lr);
        metrics.grad_norm.set(grad_norm);
        metrics.tokens_per_second.set(tokens_per_second);
        metrics.tokens.inc_by(record.tokens as u64);
        run.opts.reporter.update(|p| {
            p.step = step;
            p.epoch = record.epoch;
            p.loss = Some(loss);
            p.learning_rate = lr;
            p.tokens_per_second = tokens_per_second;
            p.eta_seconds = Some(eta);
        });
        tracing::info!(
            "{}step {step}/{total_steps} loss {loss:.4} lr {lr:.3e} grad_norm {grad_norm:.3} \
             tokens/s {tokens_per_second:.0} epoch {:.2} eta {eta:.0}s{}",
            if self.tty {
                progress_bar(step, total_steps)
            } else {
                String::new()
            },
            record.epoch,
            record
                .comm_seconds
                .map_or(String::new(), |c| format!(" comm {c:.3}s")),
        );
        Ok(())
    }
}

/// Keeps the records of steps `<= step` (a resume redoes the later ones) and opens the file for appending.
fn open_step_log(path: &Path, step: u64) -> Result<std::fs::File, TrainError> {
    let io = |e| TrainError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    if path.exists() {
        let text = std::fs::read_to_string(path).map_err(io)?;
        let kept: String = text
            .lines()
            .filter(|l| serde_json::from_str::<StepRecord>(l).is_ok_and(|r| r.step <= step))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(path, kept).map_err(io)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)
}

fn progress_bar(step: u64, total_steps: u64) -> String {
    const WIDTH: u64 = 24;
    let filled = (step * WIDTH)
        .checked_div(total_steps)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    format!(
        "[{}{}] ",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_keeps_the_step_log_of_a_trainer_older_than_packing() {
        let dir = std::env::temp_dir().join(format!("camelid-step-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.jsonl");
        // Lines as the trainer wrote them before `computed_tokens` existed.
        let old = |step: u64| {
            format!(
                "{{\"step\":{step},\"loss\":2.5,\"learning_rate\":0.001,\"grad_norm\":1.0,\"tokens\":90,\
                 \"trainable_tokens\":40,\"epoch\":0.5,\"seconds\":1.0}}\n"
            )
        };
        std::fs::write(&path, format!("{}{}{}", old(1), old(2), old(3))).unwrap();
        drop(open_step_log(&path, 2).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}{}", old(1), old(2))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
