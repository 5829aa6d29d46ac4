//! Cross-entropy over the vocabulary without materializing the logits of the whole batch.
//!
//! Only positions that carry the loss are projected at all (user turns, system prompts and padding are skipped),
//! in chunks whose f32 logits stay within a memory budget; each chunk's gradient is computed in closed form
//! (`softmax - one_hot`) and pushed into the hidden states and the projection weight at once. At seq 2048 x 8
//! with a 49k vocabulary the full logits, their log-softmax and its gradient would be 3 x 3.2 GB.

use tch::{Kind, TchError, Tensor};

#[cfg(test)]
use crate::data::batching::IGNORE_INDEX;

/// f32 logits per chunk are kept under this many bytes (fewer, larger kernels on a GPU).
const CHUNK_BYTES_CPU: i64 = 256 << 20;
const CHUNK_BYTES_CUDA: i64 = 1 << 30;

/// For `hidden` `[n, h]` (the final-normed states, in the compute dtype), the vocabulary projection `weight`
/// `[vocab, h]`, `targets` `[n]` and `rows`, the positions whose target is not
/// [`crate::data::batching::IGNORE_INDEX`]: returns the
/// summed loss (a 0-dim f64 tensor, left on the device) and the gradient of `loss * scale` with respect to
/// `hidden`, and adds the gradient with respect to `weight` into `weight_grad` (f32) unless the projection is
/// frozen (`None`: LoRA training).
pub fn linear_cross_entropy(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    rows: &Tensor,
    scale: f64,
    weight_grad: Option<&Tensor>,
) -> Result<(Tensor, Tensor), TchError> {
    tch::no_grad(|| {
        let weight = weight.f_detach()?;
        let hidden = hidden.f_detach()?;
        let grad_hidden = hidden.f_zeros_like()?;
        let count = rows.size()[0];
        let mut loss = Tensor::f_zeros([], (Kind::Double, hidden.device()))?;
        if count == 0 {
            return Ok((loss, grad_hidden));
        }
        let vocab = weight.size()[0];
        let budget = if hidden.device().is_cuda() {
            CHUNK_BYTES_CUDA
        } else {
            CHUNK_BYTES_CPU
        };
        let chunk = (budget / (vocab * 4)).max(1);
        let mut start = 0;
        while start < count {
            let len = chunk.min(count - start);
            let index = rows.f_narrow(0, start, len)?;
            let h = hidden.f_index_select(0, &index)?;
            let t = targets.f_index_select(0, &index)?.f_unsqueeze(1)?;
            let mut logits = h.f_matmul(&weight.f_tr()?)?.f_to_kind(Kind::Float)?;
            let lse = logits.f_logsumexp(&[-1i64][..], true)?;
            let chunk_loss = lse.f_sub(&logits.f_gather(1, &t, false)?)?.f_sum(Kind::Float)?;
            loss = loss.f_add(&chunk_loss.f_to_kind(Kind::Double)?)?;
            // d loss / d logits = softmax - one_hot(target), computed in place over the logits.
            let _ = logits.f_sub_(&lse)?.f_exp_()?;
            let minus_one = Tensor::f_full([len, 1], -1.0, (Kind::Float, logits.device()))?;
            let _ = logits.f_scatter_add_(1, &t, &minus_one)?.f_mul_scalar_(scale)?;
            let grad_logits = logits.f_to_kind(h.kind())?;
            let _ = grad_hidden
                .shallow_clone()
                .f_index_copy_(0, &index, &grad_logits.f_matmul(&weight)?)?;
            if let Some(weight_grad) = weight_grad {
                let grad_weight = grad_logits.f_tr()?.f_matmul(&h)?;
                let _ = weight_grad
                    .shallow_clone()
                    .f_add_(&grad_weight.f_to_kind(Kind::Float)?)?;
            }
            start += len;
        }
        Ok((loss, grad_hidden))
    })
}

#[cfg(test)]
mod tests {
    use tch::{Device, Reduction};

    use super::*;

    #[test]
    fn matches_autograd_through_the_full_logits() {
        tch::manual_seed(3);
        let (n, h, v) = (7, 5, 11);
        let hidden = Tensor::randn([n, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let weight = Tensor::randn([v, h], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let targets = Tensor::from_slice(&[3i64, -100, 0, 10, -100, 4, 4]);
        let rows = Tensor::from_slice(&[0i64, 2, 3, 5, 6]);
        let scale = 0.25;
        let reference = hidden.matmul(&weight.tr()).cross_entropy_loss::<Tensor>(
            &targets,
            None,
            Reduction::Sum,
            IGNORE_INDEX,
            0.0,
        );
        (&reference * scale).backward();
        let weight_grad = Tensor::zeros([v, h], (Kind::Float, Device::Cpu));
        let (loss, grad_hidden) =
            linear_cross_entropy(&hidden, &weight, &targets, &rows, scale, Some(&weight_grad)).unwrap();
        assert!((f64::try_from(&loss).unwrap() - f64::try_from(&reference).unwrap()).abs() < 1e-5);
        let diff = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
        assert!(diff(&grad_hidden, &hidden.grad()) < 1e-6);
        assert!(diff(&weight_grad, &weight.grad()) < 1e-6);
        // Rows without a target get no gradient at all.
        assert_eq!(
            f64::try_from(grad_hidden.get(1).abs().sum(Kind::Float)).unwrap(),
            0.0
        );
    }
}
