//! The helper threads of a decode loop, and how a product's output rows are shared among them.
//!
//! A product's rows are cut into chunks, each thread owning a consecutive run of them, which it takes from the
//! front so its weights stay one sequential stream; a thread whose run is done takes chunks from the back of the
//! run with the most left. Splitting the rows in fixed halves left the caller waiting on a slower helper for 18%
//! of a Q4_0 decode on 2 cores (`perf`): the two halves differ in how many matrices they cross and in what the
//! other core is doing. Which thread computes a row never changes its bits.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::{MAX_ROWS, Product, WeightRef, side_by_side, stacked};
use crate::error::Result;

/// How long an idle helper spins before it blocks (between tokens the decoding thread samples and detokenizes).
const SPIN: Duration = Duration::from_millis(20);
/// Chunks per thread's run: enough that the last chunks even out the threads, few enough that each is a stream
/// of many rows (SmolLM2's smallest product, 576 rows on 2 threads, gets chunks of 48).
const CHUNKS_PER_PART: usize = 8;
/// Chunk rows are a multiple of every tile's weight rows (1, 2 or 3, and interleaved groups of 8), so a chunk ends
/// in a partial tile only at the end of a matrix (partial tiles cost speed, never bits).
const CHUNK_ALIGN: usize = 24;

/// A product's output rows, `[first, first + len)`, for every input row (`[batch][len]`).
type Block = (usize, usize, Vec<f32>);

/// Work for a helper thread.
enum Job<'a> {
    /// Chunks of a product's rows, taken from `chunks` as part `part`.
    Rows {
        product: Product<'a>,
        chunks: Arc<Chunks>,
        part: usize,
    },
    /// Part `part` of [`DecodePool::split`]'s work.
    Part {
        work: &'a (dyn Fn(usize) -> Vec<f32> + Sync + 'a),
        part: usize,
    },
}

/// What a helper sends back for a [`Job`].
enum Done {
    Rows(Vec<Block>),
    Part(Vec<f32>),
}

impl Job<'_> {
    fn run(self) -> Done {
        match self {
            Job::Rows {
                product,
                chunks,
                part,
            } => Done::Rows(share(&product, &chunks, part)),
            Job::Part { work, part } => Done::Part(work(part)),
        }
    }
}

/// The chunks part `part` takes of a product, computed.
fn share(product: &Product<'_>, chunks: &Chunks, part: usize) -> Vec<Block> {
    let mut blocks = Vec::new();
    while let Some(rows) = chunks.next(part) {
        blocks.push((rows.start, rows.len(), product.compute(rows)));
    }
    blocks
}

/// A product's output rows cut into chunks, with each part's run of them: the part takes its own run from the
/// front, then the back chunks of whichever run has the most left.
#[derive(Debug)]
pub(super) struct Chunks {
    rows: usize,
    chunk: usize,
    /// Per part: the next chunk of its run (high 32 bits) and the end of the run (low 32 bits), changed together
    /// by compare-and-swap so a chunk is taken once.
    runs: Vec<AtomicU64>,
}

fn pack(front: usize, end: usize) -> u64 {
    ((front as u64) << 32) | end as u64
}

fn unpack(run: u64) -> (usize, usize) {
    ((run >> 32) as usize, (run & u64::from(u32::MAX)) as usize)
}

impl Chunks {
    /// `rows` rows shared by `parts` parts.
    pub(super) fn new(rows: usize, parts: usize) -> Self {
        let parts = parts.max(1);
        let chunk = rows
            .div_ceil(parts * CHUNKS_PER_PART)
            .next_multiple_of(CHUNK_ALIGN)
            .max(CHUNK_ALIGN);
        // Chunk indices fit 32 bits: a chunk has at least 24 rows, and no matrix has 2^34 rows.
        let count = rows.div_ceil(chunk).min(u32::MAX as usize);
        let per = count.div_ceil(parts);
        let runs = (0..parts)
            .map(|p| AtomicU64::new(pack((p * per).min(count), ((p + 1) * per).min(count))))
            .collect();
        Chunks { rows, chunk, runs }
    }

    fn rows_of(&self, chunk: usize) -> Range<usize> {
        chunk * self.chunk..((chunk + 1) * self.chunk).min(self.rows)
    }

    /// The next rows for `part`: the front chunk of its own run, else the back chunk of the run with the most
    /// left; None once every chunk is taken.
    pub(super) fn next(&self, part: usize) -> Option<Range<usize>> {
        self.take_front(part).or_else(|| self.steal())
    }

    // Relaxed ordering throughout: the runs publish no other memory (results travel back over channels), and a
    // compare-and-swap on one word is atomic at any ordering.
    fn take_front(&self, part: usize) -> Option<Range<usize>> {
        let run = self.runs.get(part)?;
        let mut now = run.load(Ordering::Relaxed);
        loop {
            let (front, end) = unpack(now);
            if front >= end {
                return None;
            }
            match run.compare_exchange_weak(now, pack(front + 1, end), Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(self.rows_of(front)),
                Err(seen) => now = seen,
            }
        }
    }

    fn steal(&self) -> Option<Range<usize>> {
        loop {
            let (victim, now) = self
                .runs
                .iter()
                .map(|run| run.load(Ordering::Relaxed))
                .enumerate()
                .max_by_key(|&(_, run)| {
                    let (front, end) = unpack(run);
                    end.saturating_sub(front)
                })?;
            let (front, end) = unpack(now);
            if front >= end {
                return None;
            }
            let taken = pack(front, end - 1);
            if self.runs[victim]
                .compare_exchange(now, taken, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some(self.rows_of(end - 1));
            }
        }
    }
}

/// The rows of `0..total` that no block covers, the blocks sorted by their first row.
fn gaps(blocks: &mut [Block], total: usize) -> Vec<Range<usize>> {
    blocks.sort_unstable_by_key(|&(first, _, _)| first);
    let mut covered = 0;
    let mut gaps = Vec::new();
    for &(first, width, _) in blocks.iter() {
        if first > covered {
            gaps.push(covered..first);
        }
        covered = covered.max(first + width);
    }
    if covered < total {
        gaps.push(covered..total);
    }
    gaps
}

fn recv_spinning<T>(rx: &Receiver<T>) -> Option<T> {
    let started = Instant::now();
    for spins in 0u32.. {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(TryRecvError::Disconnected) => return None,
            // Reading the clock costs more than a channel poll: look at it only now and then.
            Err(TryRecvError::Empty) if spins % 1024 == 1023 && started.elapsed() >= SPIN => break,
            Err(TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
    rx.recv().ok()
}

/// Helper threads for the matrix-vector products of one decode loop; see [`with_decode_pool`].
pub struct DecodePool<'a> {
    helpers: Vec<(Sender<Job<'a>>, Receiver<Done>)>,
}

impl std::fmt::Debug for DecodePool<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodePool")
            .field("helpers", &self.helpers.len())
            .finish()
    }
}

/// Runs `f` with a pool of helper threads (one per core beyond the caller's), joined when `f` returns.
pub fn with_decode_pool<'a, R>(f: impl FnOnce(&DecodePool<'a>) -> R) -> R {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let mut helpers = Vec::with_capacity(threads.saturating_sub(1));
        for _ in 1..threads {
            let (job_tx, job_rx) = std::sync::mpsc::channel::<Job<'a>>();
            let (out_tx, out_rx) = std::sync::mpsc::channel();
            scope.spawn(move || {
                while let Some(job) = recv_spinning(&job_rx) {
                    if out_tx.send(job.run()).is_err() {
                        break;
                    }
                }
            });
            helpers.push((job_tx, out_rx));
        }
        // Dropping the pool closes the job channels, which ends the helpers before the scope joins them.
        let pool = DecodePool { helpers };
        f(&pool)
    })
}

impl<'a> DecodePool<'a> {
    /// The product's outputs, `[batch][total]`, its rows shared between the caller and the helpers.
    fn run(&self, product: Product<'a>) -> Vec<f32> {
        let total = product.total_rows();
        let chunks = Arc::new(Chunks::new(total, self.parts()));
        let mut sent = Vec::with_capacity(self.helpers.len());
        for (i, (tx, rx)) in self.helpers.iter().enumerate() {
            let job = Job::Rows {
                product: product.clone(),
                chunks: Arc::clone(&chunks),
                part: i + 1,
            };
            if tx.send(job).is_ok() {
                sent.push(rx);
            }
        }
        let mut blocks = share(&product, &chunks, 0);
        for rx in sent {
            if let Some(Done::Rows(theirs)) = recv_spinning(rx) {
                blocks.extend(theirs);
            }
        }
        // A helper only disappears if it panicked, losing the chunk it held: rows no block covers run here.
        for rows in gaps(&mut blocks, total) {
            blocks.push((rows.start, rows.len(), product.compute(rows)));
        }
        side_by_side(blocks, total, product.batch)
    }

    /// How many parts [`DecodePool::split`] runs at once: the caller and each helper.
    pub(crate) fn parts(&self) -> usize {
        self.helpers.len() + 1
    }

    /// `work(0)`, ..., `work(parts() - 1)` run at once, part 0 on the caller and the others on the helpers, their
    /// results in part order: work between the products (attention over each sequence's cache) spread over the
    /// cores the helpers would otherwise spin on.
    #[allow(unsafe_code)]
    pub(crate) fn split(&self, work: &(dyn Fn(usize) -> Vec<f32> + Sync)) -> Vec<Vec<f32>> {
        // SAFETY: only the lifetime is changed. Each helper that is sent `work` either sends back its result or
        // drops its end of the result channel (it panicked and unwound); the loop below waits for one of the two
        // from every such helper before this function returns or resumes a panic of its own part, so no helper
        // still holds `work` once its true lifetime can end.
        let shared: &'a (dyn Fn(usize) -> Vec<f32> + Sync + 'a) = unsafe { std::mem::transmute(work) };
        let mut sent = Vec::with_capacity(self.helpers.len());
        for (i, (tx, rx)) in self.helpers.iter().enumerate() {
            let job = Job::Part {
                work: shared,
                part: i + 1,
            };
            if tx.send(job).is_ok() {
                sent.push((rx, i + 1));
            }
        }
        let own = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(0)));
        let mut results: Vec<Option<Vec<f32>>> = (0..self.parts()).map(|_| None).collect();
        for (rx, part) in sent {
            if let Some(Done::Part(out)) = recv_spinning(rx) {
                results[part] = Some(out);
            }
        }
        match own {
            Ok(out) => results[0] = Some(out),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        // A helper that is gone (it panicked) or was never reached: its part runs here.
        let finish = |(part, out): (usize, Option<Vec<f32>>)| out.unwrap_or_else(|| work(part));
        results.into_iter().enumerate().map(finish).collect()
    }

    /// `x W_i^T (+ b_i)` for each weight when `x` holds at most [`MAX_ROWS`] CPU rows and the weights are
    /// contiguous f32 or bf16 matrices without gradients; None otherwise (the caller uses libtorch).
    pub fn linear_single_row_many(
        &self,
        x: &Tensor,
        weights: &[(&'a Tensor, Option<&Tensor>)],
    ) -> Result<Option<Vec<Tensor>>> {
        let cols = x.size().last().copied().unwrap_or(0);
        let batch = if cols > 0 { x.numel() as i64 / cols } else { 0 };
        let usable =
            x.device() == Device::Cpu && (1..=MAX_ROWS as i64).contains(&batch) && !x.requires_grad();
        let matrices = weights.iter().map(|(w, _)| (*w, None));
        let Some((matrices, starts)) = stacked(matrices, cols as usize).filter(|_| usable) else {
            return Ok(None);
        };
        let input = Vec::<f32>::try_from(x.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
        let total = starts[starts.len() - 1] as i64;
        let out = self.run(Product::new(
            matrices,
            starts,
            input,
            cols as usize,
            batch as usize,
        ));
        // Bias is added before rounding to the input's dtype, as libtorch's addmm does.
        let all = Tensor::f_from_slice(&out)?.f_view([batch, total])?;
        let mut results = Vec::with_capacity(weights.len());
        let mut offset = 0;
        for (w, bias) in weights {
            let rows = w.size()[0];
            let mut shape = x.size();
            if let Some(last) = shape.last_mut() {
                *last = rows;
            }
            let mut y = all.f_narrow(1, offset, rows)?;
            if let Some(b) = bias {
                y = y.f_add(&b.f_to_kind(Kind::Float)?)?;
            }
            results.push(y.f_to_kind(x.kind())?.f_reshape(&shape)?);
            offset += rows;
        }
        Ok(Some(results))
    }

    /// `x W_i^T` for each weight over `batch` f32 input rows of `cols` values (`input` row-major), returned
    /// row-major too: input row `b`'s outputs, weights in order, are `out[b * total..(b + 1) * total]`. None when
    /// a weight is not a matrix the kernels read (see [`stacked`]) or the batch is outside the kernel's rows.
    pub fn products(&self, weights: &[WeightRef<'a>], input: Vec<f32>, batch: usize) -> Option<Vec<f32>> {
        let cols = input.len() / batch.max(1);
        if !(1..=MAX_ROWS).contains(&batch) || cols == 0 || input.len() != batch * cols {
            return None;
        }
        let (matrices, starts) = stacked(weights.iter().copied(), cols)?;
        Some(self.run(Product::new(matrices, starts, input, cols, batch)))
    }

    /// [`DecodePool::linear_single_row_many`] for one weight.
    pub fn linear_single_row(
        &self,
        x: &Tensor,
        weight: &'a Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        Ok(self
            .linear_single_row_many(x, &[(weight, bias)])?
            .and_then(|mut v| v.pop()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk `parts` threads take, in the order each takes them.
    fn drain(chunks: &Chunks, parts: usize) -> Vec<Vec<Range<usize>>> {
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..parts)
                .map(|part| scope.spawn(move || std::iter::from_fn(|| chunks.next(part)).collect()))
                .collect();
            threads.into_iter().map(|t| t.join().expect("no panic")).collect()
        })
    }

    #[test]
    fn every_row_is_taken_once_whoever_takes_it() {
        for (rows, parts) in [
            (960, 2),
            (576, 2),
            (49_152, 2),
            (7, 2),
            (1, 3),
            (0, 2),
            (3072, 5),
            (100, 1),
        ] {
            let chunks = Chunks::new(rows, parts);
            let mut taken: Vec<Range<usize>> = drain(&chunks, parts).concat();
            taken.sort_by_key(|r| r.start);
            let mut next = 0;
            for r in &taken {
                assert_eq!(
                    r.start, next,
                    "{rows} rows on {parts}: a gap or an overlap at {next}"
                );
                assert!(!r.is_empty());
                next = r.end;
            }
            assert_eq!(next, rows, "{rows} rows on {parts}: rows left over");
        }
    }

    #[test]
    fn a_part_takes_its_own_run_in_order_then_the_back_of_the_largest() {
        let chunks = Chunks::new(1152, 2);
        // Part 1 never comes: part 0 streams its run from the front, then takes part 1's from the back.
        let alone: Vec<Range<usize>> = std::iter::from_fn(|| chunks.next(0)).collect();
        assert_eq!(alone.len(), 16);
        assert_eq!(
            alone[..8],
            (0..8).map(|c| c * 72..(c + 1) * 72).collect::<Vec<_>>()[..]
        );
        assert_eq!(alone[8], 1080..1152);
        assert_eq!(alone[15], 576..648);
        // Chunks are multiples of every tile height, so only a matrix's last chunk ends in a partial tile.
        assert!(alone.iter().all(|r| r.len() % CHUNK_ALIGN == 0));
        assert_eq!(chunks.next(1), None);
    }

    #[test]
    fn rows_no_block_covers_are_found() {
        let block = |first: usize, width: usize| (first, width, Vec::new());
        assert_eq!(gaps(&mut [], 10), vec![(0..10)]);
        assert_eq!(gaps(&mut [block(6, 4), block(0, 3)], 10), vec![(3..6)]);
        assert_eq!(gaps(&mut [block(0, 4)], 10), vec![(4..10)]);
        assert!(gaps(&mut [block(4, 6), block(0, 4)], 10).is_empty());
    }

    #[test]
    fn chunks_shared_by_four_threads_match_one_thread_on_quantized_and_dense_rows() {
        // A Q8_0 matrix of 101 rows (not a multiple of a chunk or a tile), an interleaved Q4_0 one whose groups
        // start 101 rows in (so chunks cut through groups), and a dense one, four parts.
        use crate::quant::{GgmlType, Layout, QuantFormat};
        let cols = 64;
        let wf: Vec<f32> = (0..101 * cols)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.3)
            .collect();
        let q = Tensor::from_slice(&crate::quant::quantize_q8_0(&wf)).view([101, -1]);
        let q4 = crate::quant::quantize_q4_0(&wf[..40 * cols]);
        let q4 = crate::interleave::interleave(GgmlType::Q4_0, &q4, 40).expect("whole groups");
        let q4 = Tensor::from_slice(&q4).view([40, -1]);
        let interleaved = QuantFormat {
            ty: GgmlType::Q4_0,
            layout: Layout::Interleaved,
        };
        let dense = Tensor::randn([35, cols as i64], (Kind::Float, Device::Cpu));
        let weights: [WeightRef<'_>; 3] = [
            (&q, Some(QuantFormat::rows(GgmlType::Q8_0))),
            (&q4, Some(interleaved)),
            (&dense, None),
        ];
        let x: Vec<f32> = (0..3 * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let (matrices, starts) = stacked(weights.iter().copied(), cols).expect("kernel matrices");
        let product = Product::new(matrices, starts, x, cols, 3);
        let total = 176;
        let chunks = Chunks::new(total, 4);
        let (shared, chunks) = (&product, &chunks);
        let mut blocks: Vec<Block> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|part| scope.spawn(move || share(shared, chunks, part)))
                .collect();
            threads
                .into_iter()
                .flat_map(|t| t.join().expect("no panic"))
                .collect()
        });
        assert!(gaps(&mut blocks, total).is_empty());
        assert_eq!(side_by_side(blocks, total, 3), product.compute(0..total));
        // Group by group or row by row, the interleaved rows are the same.
        let single: Vec<f32> = (101..141).map(|r| product.compute(r..r + 1)[0]).collect();
        let whole = product.compute(101..141);
        assert_eq!(single, whole[..40], "first input row");
    }

    #[test]
    fn products_shared_by_the_pool_match_one_thread() {
        tch::manual_seed(3);
        let opts = (Kind::Float, Device::Cpu);
        let (a, b) = (Tensor::randn([333, 64], opts), Tensor::randn([101, 64], opts));
        let x: Vec<f32> = (0..3 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let weights: [WeightRef<'_>; 2] = [(&a, None), (&b, None)];
        let pooled = with_decode_pool(|p| p.products(&weights, x.clone(), 3).expect("kernel applies"));
        let (matrices, starts) = stacked(weights.iter().copied(), 64).expect("dense matrices");
        let product = Product::new(matrices, starts, x, 64, 3);
        assert_eq!(pooled, product.compute(0..434));
    }
}
