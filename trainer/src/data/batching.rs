//! The order samples are trained in: micro-batches of similar length (less padding), shuffled from the seed, the
//! same on every run and every resume. A position in the data is one number, the index of the next micro-batch in
//! the endless sequence epoch 0, epoch 1, ...
//!
//! A micro-batch becomes tensors one of two ways: padded (one row per sample, [`collate`]) or packed (its samples
//! back to back in one row, [`collate_packed`]), where positions restart per sample and attention never crosses
//! a sample's end. Packing computes the same loss on the same samples without computing padding, so it changes
//! neither the data order nor what a step learns, only the float rounding; the one exception is LoRA dropout,
//! whose masks are drawn over the micro-batch's tensor (so a LoRA run with dropout records packing in its
//! checkpoint identity).

use camelid_model::llama::{Llama, RopeTables};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

use crate::data::tokenize::Sample;

/// How many micro-batches' worth of samples are sorted by length together (HF's `group_by_length` uses 50).
const LENGTH_GROUP_BATCHES: usize = 50;

/// The label value that `cross_entropy` ignores.
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, Clone)]
pub struct Batcher {
    lengths: Vec<usize>,
    micro_batch: usize,
    seed: u64,
    group_by_length: bool,
}

impl Batcher {
    pub fn new(samples: &[Sample], micro_batch: usize, seed: u64, group_by_length: bool) -> Self {
        Self {
            lengths: samples.iter().map(|s| s.ids.len()).collect(),
            micro_batch: micro_batch.max(1),
            seed,
            group_by_length,
        }
    }

    /// Micro-batches per epoch; the last one may be smaller (no sample is left out).
    pub fn batches_per_epoch(&self) -> usize {
        self.lengths.len().div_ceil(self.micro_batch)
    }

    /// The micro-batches (sample indices) of `epoch`, in training order.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.lengths.len()).collect();
        order.shuffle(&mut rng);
        if !self.group_by_length {
            return order.chunks(self.micro_batch).map(<[usize]>::to_vec).collect();
        }
        let mut batches = Vec::with_capacity(self.batches_per_epoch());
        for group in order.chunks(self.micro_batch * LENGTH_GROUP_BATCHES) {
            let mut group = group.to_vec();
            group.sort_by_key(|&i| std::cmp::Reverse(self.lengths[i]));
            batches.extend(group.chunks(self.micro_batch).map(<[usize]>::to_vec));
        }
        // Groups sorted by length would otherwise put every long batch at the start of its group.
        batches.shuffle(&mut rng);
        batches
    }
}

/// One micro-batch as tensors: `input` `[batch, t]` right-padded (causal attention never looks at the padding
/// after a sequence) or `[1, t]` packed, `targets` the next token where it carries the loss and [`IGNORE_INDEX`]
/// elsewhere.
#[derive(Debug)]
pub struct MicroBatch {
    pub input: Tensor,
    pub targets: Tensor,
    /// Real (non-padding) tokens.
    pub tokens: usize,
    /// Tokens that carry the loss.
    pub trainable: usize,
    /// Their positions in the flattened `[batch * t]` targets (known here, so the device never has to report
    /// them back).
    pub trainable_rows: Tensor,
    /// The micro-batch's place in the run's order (seeds LoRA dropout, so a resumed run draws the same masks).
    pub position: u64,
    /// The packed samples' lengths in row order; empty when padded.
    pub segments: Vec<usize>,
}

impl MicroBatch {
    /// The RoPE tables (and, packed, the attention segments) the decoder layers of this micro-batch use.
    pub fn rope(&self, model: &Llama) -> camelid_model::Result<RopeTables> {
        if self.segments.is_empty() {
            model.rope_for_training(self.input.size()[1] as usize)
        } else {
            model.rope_for_packed(&self.segments)
        }
    }
}

/// `samples` back to back in one row with no padding (sequence packing). A sample's last token has no target, so
/// no sample ever learns to predict the next sample's first token.
pub fn collate_packed(samples: &[&Sample], device: Device) -> Result<MicroBatch, tch::TchError> {
    let starts: Vec<usize> = samples
        .iter()
        .scan(0, |at, s| {
            let start = *at;
            *at += s.ids.len();
            Some(start)
        })
        .collect();
    let total = samples.iter().map(|s| s.ids.len()).sum::<usize>();
    let mut batch = lay_out(samples, &starts, [1, total], 0, device)?;
    if samples.len() > 1 {
        batch.segments = samples.iter().map(|s| s.ids.len()).collect();
    }
    Ok(batch)
}

/// One row per sample, right-padded with `pad_id` to the longest.
pub fn collate(samples: &[&Sample], pad_id: u32, device: Device) -> Result<MicroBatch, tch::TchError> {
    let t = samples.iter().map(|s| s.ids.len()).max().unwrap_or(1).max(1);
    let starts: Vec<usize> = (0..samples.len()).map(|row| row * t).collect();
    lay_out(samples, &starts, [samples.len(), t], pad_id, device)
}

/// The micro-batch with sample `i` written from flat position `starts[i]` (increasing) of a `shape` batch filled
/// with `pad_id`: the one place that decides which positions carry the loss (the next token, where labelled).
fn lay_out(
    samples: &[&Sample],
    starts: &[usize],
    shape: [usize; 2],
    pad_id: u32,
    device: Device,
) -> Result<MicroBatch, tch::TchError> {
    let size = shape[0] * shape[1];
    let mut input = vec![i64::from(pad_id); size];
    let mut targets = vec![IGNORE_INDEX; size];
    let mut rows = Vec::new();
    for (s, &start) in samples.iter().zip(starts) {
        for (j, &id) in s.ids.iter().enumerate() {
            input[start + j] = i64::from(id);
            if j + 1 < s.ids.len() && s.labels[j + 1] {
                targets[start + j] = i64::from(s.ids[j + 1]);
                rows.push((start + j) as i64);
            }
        }
    }
    let shape = shape.map(|n| n as i64);
    Ok(MicroBatch {
        input: Tensor::f_from_slice(&input)?.f_view(shape)?.f_to_device(device)?,
        targets: Tensor::f_from_slice(&targets)?
            .f_view(shape)?
            .f_to_device(device)?,
        tokens: samples.iter().map(|s| s.ids.len()).sum(),
        trainable: rows.len(),
        trainable_rows: Tensor::f_from_slice(&rows)?.f_to_device(device)?,
        position: 0,
        segments: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Sample {
        Sample {
            id: format!("s{len}"),
            ids: (0..len as u32).collect(),
            labels: (0..len).map(|i| i % 2 == 1).collect(),
        }
    }

    #[test]
    fn every_sample_appears_once_per_epoch_in_a_seeded_order() {
        let samples: Vec<Sample> = (1..=23).map(sample).collect();
        let batcher = Batcher::new(&samples, 4, 7, true);
        assert_eq!(batcher.batches_per_epoch(), 6);
        let epoch0 = batcher.epoch(0);
        let mut seen: Vec<usize> = epoch0.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..23).collect::<Vec<_>>());
        assert_eq!(epoch0, Batcher::new(&samples, 4, 7, true).epoch(0));
        assert_ne!(epoch0, batcher.epoch(1));
        // Within a length group, batches hold neighbouring lengths.
        for batch in &epoch0 {
            let lens: Vec<usize> = batch.iter().map(|&i| samples[i].ids.len()).collect();
            assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
        }
    }

    #[test]
    fn collate_pads_right_and_shifts_labels() {
        let (a, b) = (sample(4), sample(2));
        let batch = collate(&[&a, &b], 99, Device::Cpu).unwrap();
        let input: Vec<i64> = Vec::try_from(batch.input.flatten(0, -1)).unwrap();
        let targets: Vec<i64> = Vec::try_from(batch.targets.flatten(0, -1)).unwrap();
        assert_eq!(input, [0, 1, 2, 3, 0, 1, 99, 99]);
        // Labels on positions 1 and 3 of `a` and 1 of `b`: predicted from the position before.
        assert_eq!(targets, [1, -100, 3, -100, 1, -100, -100, -100]);
        assert_eq!((batch.tokens, batch.trainable), (6, 3));
        assert_eq!(Vec::<i64>::try_from(&batch.trainable_rows).unwrap(), [0, 2, 4]);
    }

    #[test]
    fn collate_packed_puts_samples_back_to_back_and_never_targets_across_them() {
        let (a, b) = (sample(4), sample(3));
        let batch = collate_packed(&[&a, &b], Device::Cpu).unwrap();
        let input: Vec<i64> = Vec::try_from(batch.input.flatten(0, -1)).unwrap();
        let targets: Vec<i64> = Vec::try_from(batch.targets.flatten(0, -1)).unwrap();
        assert_eq!(batch.input.size(), [1, 7]);
        assert_eq!(input, [0, 1, 2, 3, 0, 1, 2]);
        // `a`'s last position would predict `b`'s first token: it carries no loss.
        assert_eq!(targets, [1, -100, 3, -100, 1, -100, -100]);
        assert_eq!((batch.tokens, batch.trainable), (7, 3));
        assert_eq!(Vec::<i64>::try_from(&batch.trainable_rows).unwrap(), [0, 2, 4]);
        assert_eq!(batch.segments, [4, 3]);
        // One sample packs to the plain sequence.
        assert!(collate_packed(&[&a], Device::Cpu).unwrap().segments.is_empty());
    }
}
