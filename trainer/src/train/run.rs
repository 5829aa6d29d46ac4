//! The state a training run carries between steps, how it is set up, and how it is checkpointed and restored: which
//! micro-batches a step (and each rank) takes, the checkpoint files of this rank, and the checks before a resume.
//! Two phases of [`super::train`] live here: [`Run::set_up`] (after the model and data are ready) and
//! [`Run::resume`] (before the first step).

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use camelid_model::LoadedModel;
use tch::Tensor;

use super::prepare::Prepared;
use super::{Resume, RunOptions, write_json};
use crate::checkpoint::{self, Manifest, State, shard_file};
use crate::config::{TrainConfig, differences, hash_json};
use crate::data::batching::{Batcher, MicroBatch, collate, collate_packed};
use crate::data::tokenize::Sample;
use crate::error::TrainError;
use crate::optim::{AdamW, AdamWConfig};
use crate::progress::{LastCheckpoint, Phase};
use crate::step::Backend;
use crate::torchrun::Comm;

pub(crate) fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Everything the loop carries between steps.
pub(crate) struct Run<'a> {
    pub(crate) cfg: &'a TrainConfig,
    pub(crate) model: LoadedModel,
    pub(crate) engine: Backend,
    pub(crate) optimizer: AdamW,
    pub(crate) comm: Comm,
    pub(crate) samples: Vec<Sample>,
    pub(crate) batcher: Batcher,
    /// Optimizer steps of the whole run.
    pub(crate) total_steps: u64,
    /// Micro-batches of the whole run (over all ranks).
    pub(crate) total_micro: u64,
    pub(crate) identity: serde_json::Value,
    pub(crate) config_hash: String,
    pub(crate) checkpoint_dir: PathBuf,
    pub(crate) output: PathBuf,
    pub(crate) opts: &'a RunOptions,
    pub(crate) epoch_cache: Option<(u64, Vec<Vec<usize>>)>,
}

/// Where the step loop starts: the step, how many of its micro-batches are done, and their partial loss sum and
/// trainable tokens (all zero for a fresh run, or when resuming at a step boundary).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Position {
    pub(super) step: u64,
    pub(super) micro: u64,
    pub(super) partial: (f64, u64),
}

impl<'a> Run<'a> {
    /// Sets up the run from the prepared model and data: the data order and the step counts, the run's identity
    /// (what a checkpoint must match to be resumed) and a fresh optimizer over the engine's masters.
    pub(super) fn set_up(
        cfg: &'a TrainConfig,
        opts: &'a RunOptions,
        prepared: Prepared,
    ) -> Result<Self, TrainError> {
        let Prepared {
            paths,
            data_sha,
            model,
            samples,
            engine,
            comm,
        } = prepared;
        let batcher = Batcher::new(&samples, cfg.micro_batch, cfg.seed, cfg.group_by_length);
        let per_epoch = batcher.batches_per_epoch() as u64;
        let g = (cfg.grad_accum * comm.world()) as u64;
        let (total_steps, total_micro) = match cfg.max_steps {
            Some(n) => (n, n * g),
            None => {
                let micro = ((cfg.epochs * per_epoch as f64).ceil() as u64).max(1);
                (micro.div_ceil(g), micro)
            }
        };
        let mut identity = cfg.identity(&data_sha);
        identity["model"] = model.config().to_hf_json();
        if comm.world() > 1 {
            identity["world_size"] = serde_json::json!(comm.world());
        }
        let config_hash = hash_json(&identity);
        let optimizer = AdamW::new(
            AdamWConfig {
                beta1: cfg.adam_beta1,
                beta2: cfg.adam_beta2,
                eps: cfg.adam_eps,
                weight_decay: cfg.weight_decay,
            },
            engine.masters(),
        )?;
        let run = Run {
            cfg,
            model,
            engine,
            optimizer,
            comm,
            samples,
            batcher,
            total_steps,
            total_micro,
            identity,
            config_hash,
            checkpoint_dir: paths.checkpoint_dir,
            output: paths.output,
            opts,
            epoch_cache: None,
        };
        run.report_shards()?;
        Ok(run)
    }

    /// With sharded training: what this rank holds, in `/progress` and in `OUTPUT/ranks/rank-RRRRR.json`.
    fn report_shards(&self) -> Result<(), TrainError> {
        let Backend::Sharded(sharded) = &self.engine else {
            return Ok(());
        };
        let mut memory = sharded.memory();
        memory.optimizer_state_bytes = (self.optimizer.exp_avg.iter().chain(&self.optimizer.exp_avg_sq))
            .map(|t| t.numel() as u64 * 4)
            .sum();
        tracing::info!(?memory, "holding this rank's shards");
        self.opts.reporter.update(|p| p.shards = Some(memory));
        let ranks_dir = self.output.join("ranks");
        std::fs::create_dir_all(&ranks_dir).map_err(|e| TrainError::Io {
            path: ranks_dir.clone(),
            source: e,
        })?;
        write_json(
            &ranks_dir.join(format!("rank-{:05}.json", self.comm.rank())),
            &memory,
        )
    }

    /// Finds the checkpoint to resume from (as [`RunOptions::resume`] says), checks that every rank found the same,
    /// and restores it; returns where the step loop starts.
    pub(super) fn resume(&mut self) -> Result<Position, TrainError> {
        let opts = self.opts;
        let found = match &opts.resume {
            Resume::Never => None,
            Resume::Auto => checkpoint::latest(&self.checkpoint_dir)?,
            Resume::Path(p) => Some((p.clone(), checkpoint::verify(p).map_err(TrainError::ResumeFrom)?)),
        };
        // Every rank verifies on its own; they must have found the same checkpoint.
        let key = found
            .as_ref()
            .map_or(-1.0, |(_, m)| (m.step * 1_000_000 + m.micro_step) as f64);
        if self.comm.sum(&[key])?[0] != key * self.comm.world() as f64 {
            return Err(TrainError::Config(format!(
                "the ranks do not see the same newest complete checkpoint under {} (this rank: {:?}); is the \
                 checkpoint directory shared by every rank?",
                self.checkpoint_dir.display(),
                found.as_ref().map(|(dir, _)| dir)
            )));
        }
        let Some((dir, manifest)) = found else {
            if opts.resume == Resume::Auto {
                tracing::info!(dir = %self.checkpoint_dir.display(), "no complete checkpoint; starting from step 0");
            }
            return Ok(Position::default());
        };
        let (step, micro, partial) = self.restore(&dir, &manifest)?;
        tracing::info!(checkpoint = %dir.display(), step, micro_step = micro, "resuming");
        opts.reporter.update(|p| {
            p.last_checkpoint = Some(LastCheckpoint {
                step,
                time: manifest.created.clone(),
            });
        });
        Ok(Position { step, micro, partial })
    }

    /// The sample indices of micro-batch `position` of the endless sequence of epochs (each epoch's order is
    /// computed once, when the run enters it).
    pub(crate) fn batch_at(&mut self, position: u64) -> &[usize] {
        let per_epoch = self.batcher.batches_per_epoch() as u64;
        let (epoch, index) = (position / per_epoch, (position % per_epoch) as usize);
        if self.epoch_cache.as_ref().is_none_or(|(e, _)| *e != epoch) {
            self.epoch_cache = Some((epoch, self.batcher.epoch(epoch)));
        }
        self.epoch_cache
            .as_ref()
            .map_or(&[], |(_, batches)| &batches[index])
    }

    pub(crate) fn micro_batch_at(&mut self, position: u64) -> Result<MicroBatch, TrainError> {
        let indices = self.batch_at(position).to_vec();
        let rows: Vec<&Sample> = indices.iter().map(|&i| &self.samples[i]).collect();
        let pad = self
            .model
            .config()
            .pad_token_id
            .or(self.model.eos_token_ids.first().copied())
            .unwrap_or(0);
        let device = self.model.model.device();
        let mut batch = if self.cfg.packing {
            collate_packed(&rows, device)?
        } else {
            collate(&rows, pad, device)?
        };
        batch.position = position;
        Ok(batch)
    }

    /// Micro-batches per optimizer step over all ranks.
    pub(crate) fn per_step(&self) -> u64 {
        (self.cfg.grad_accum * self.comm.world()) as u64
    }

    /// Positions of step `step` in the endless sequence of micro-batches. With several ranks they are taken in
    /// rounds: in each, rank r takes the round's r-th micro-batch, so the step covers the same micro-batches in
    /// the same order as one process with `grad_accum * world` accumulation steps.
    pub(crate) fn step_range(&self, step: u64) -> std::ops::Range<u64> {
        let g = self.per_step();
        step * g..((step + 1) * g).min(self.total_micro)
    }

    /// Trainable tokens of the micro-batches at `positions`.
    pub(crate) fn trainable_at(&mut self, positions: std::ops::Range<u64>) -> u64 {
        let mut total = 0;
        for position in positions {
            let indices = self.batch_at(position).to_vec();
            total += indices
                .iter()
                .map(|&i| self.samples[i].trainable_tokens() as u64)
                .sum::<u64>();
        }
        total
    }

    pub(crate) fn save(
        &self,
        step: u64,
        micro_step: u64,
        partial: (f64, u64),
    ) -> Result<PathBuf, TrainError> {
        self.opts.reporter.update(|p| p.phase = Phase::Checkpointing);
        let names = self.engine.names();
        let params: Vec<(String, Tensor)> = names
            .iter()
            .cloned()
            .zip(self.engine.masters().iter().map(Tensor::shallow_clone))
            .collect();
        let mut optimizer = Vec::with_capacity(params.len() * 2);
        for (i, name) in names.iter().enumerate() {
            optimizer.push((
                format!("exp_avg.{name}"),
                self.optimizer.exp_avg[i].shallow_clone(),
            ));
            optimizer.push((
                format!("exp_avg_sq.{name}"),
                self.optimizer.exp_avg_sq[i].shallow_clone(),
            ));
        }
        let file = |base| shard_file(base, self.comm.rank(), self.comm.world());
        let mut files = vec![(file("model"), params), (file("optimizer"), optimizer)];
        if micro_step > 0 {
            let grads = names
                .iter()
                .cloned()
                .zip(self.engine.grads().iter().map(Tensor::shallow_clone))
                .collect();
            files.push((file("gradients"), grads));
        }
        let position = step * self.per_step() + micro_step;
        let manifest = Manifest {
            format_version: 1,
            step,
            micro_step,
            data_position: position,
            data_seed: self.cfg.seed,
            epoch: position / self.batcher.batches_per_epoch() as u64,
            optimizer_step: self.optimizer.step,
            optimizer: self.optimizer.config,
            partial_loss_sum: partial.0,
            partial_tokens: partial.1,
            config_hash: self.config_hash.clone(),
            config: self.identity.clone(),
            created: rfc3339_now(),
            files: Default::default(),
            world_size: self.comm.world() as u64,
        };
        let started = Instant::now();
        let state = State { manifest, files };
        let dir = if self.comm.world() == 1 {
            checkpoint::write(&self.checkpoint_dir, state)?
        } else {
            checkpoint::write_sharded(&self.checkpoint_dir, state, &self.comm)?
        };
        if self.comm.is_leader() {
            checkpoint::prune(&self.checkpoint_dir, self.cfg.checkpoint_keep)?;
        }
        tracing::info!(
            checkpoint = %dir.display(), step, micro_step, seconds = started.elapsed().as_secs_f64(),
            "checkpoint written"
        );
        self.opts.reporter.metrics.checkpoints.inc();
        self.opts.reporter.metrics.last_checkpoint_step.set(step as i64);
        self.opts.reporter.update(|p| {
            p.phase = Phase::Training;
            p.last_checkpoint = Some(LastCheckpoint {
                step,
                time: rfc3339_now(),
            });
        });
        Ok(dir)
    }

    /// Loads a verified checkpoint; returns (step, micro_step, partial loss/tokens).
    pub(crate) fn restore(
        &mut self,
        dir: &Path,
        manifest: &Manifest,
    ) -> Result<(u64, u64, (f64, u64)), TrainError> {
        let world = self.comm.world() as u64;
        if manifest.world_size != world {
            return Err(TrainError::Config(format!(
                "checkpoint {} was written by {} rank(s) and this run has {world}; resuming with another world \
                 size is not supported: resume it with WORLD_SIZE={}, or start over with --resume never",
                dir.display(),
                manifest.world_size,
                manifest.world_size
            )));
        }
        if manifest.config_hash != self.config_hash {
            return Err(checkpoint::CheckpointError::ConfigMismatch {
                path: dir.to_path_buf(),
                found: manifest.config_hash.clone(),
                expected: self.config_hash.clone(),
                hint: format!(
                    "changed: {}; resume with the same settings and data, or use --resume never",
                    differences(&manifest.config, &self.identity).join("; ")
                ),
            }
            .into());
        }
        let names = self.engine.names();
        let file = |base| shard_file(base, self.comm.rank(), self.comm.world());
        let masters: Vec<(String, &Tensor)> = names.iter().cloned().zip(self.engine.masters()).collect();
        load_named(dir, &file("model"), &masters)?;
        let mut moments: Vec<(String, &Tensor)> = Vec::with_capacity(names.len() * 2);
        for (i, name) in names.iter().enumerate() {
            moments.push((format!("exp_avg.{name}"), &self.optimizer.exp_avg[i]));
            moments.push((format!("exp_avg_sq.{name}"), &self.optimizer.exp_avg_sq[i]));
        }
        load_named(dir, &file("optimizer"), &moments)?;
        if manifest.micro_step > 0 {
            let grads: Vec<(String, &Tensor)> = names.iter().cloned().zip(self.engine.grads()).collect();
            load_named(dir, &file("gradients"), &grads)?;
        }
        self.optimizer.step = manifest.optimizer_step;
        self.engine.after_restore(&self.model.model)?;
        // The saved partial loss is the sum over all ranks: one rank carries it on.
        let partial_loss = if self.comm.is_leader() {
            manifest.partial_loss_sum
        } else {
            0.0
        };
        Ok((
            manifest.step,
            manifest.micro_step,
            (partial_loss, manifest.partial_tokens),
        ))
    }
}

/// Copies the tensors of `file` into `targets` (same names, same shapes, nothing missing or extra).
fn load_named(dir: &Path, file: &str, targets: &[(String, &Tensor)]) -> Result<(), TrainError> {
    let invalid = |detail: String| checkpoint::CheckpointError::Invalid {
        path: dir.join(file),
        detail,
    };
    let mut tensors: std::collections::HashMap<String, Tensor> =
        checkpoint::read_tensors(dir, file)?.into_iter().collect();
    for (name, target) in targets {
        let t = tensors
            .remove(name)
            .ok_or_else(|| invalid(format!("tensor {name} is missing")))?;
        if t.size() != target.size() {
            return Err(invalid(format!(
                "tensor {name} has shape {:?}, the model {:?}",
                t.size(),
                target.size()
            ))
            .into());
        }
        tch::no_grad(|| target.shallow_clone().f_copy_(&t))?;
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(invalid(format!("unexpected tensor {extra}")).into());
    }
    Ok(())
}
