//! Collectives across processes through libtorch's own c10d: rendezvous on a `TCPStore` (rank 0 serves it), a
//! `ProcessGroupGloo` for CPU tensors, and all-reduce, broadcast, all-gather into one tensor, reduce-scatter and
//! barrier on tch tensors. No collective is written here; the C++ shim (`src/c10d.cpp`) only exposes c10d's.
//!
//! Every call blocks until done, and fails with [`DistError`] when a peer is gone or the timeout passes, so a gang
//! with a dead rank fails fast instead of hanging.

mod ffi;

use std::ffi::CString;
use std::time::Duration;

use tch::Tensor;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("rendezvous with {addr} as rank {rank} of {world}: {message}")]
    Rendezvous {
        addr: String,
        rank: usize,
        world: usize,
        message: String,
    },
    #[error("{op} on rank {rank}: {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        message: String,
    },
    #[error("invalid arguments: {0}")]
    Invalid(String),
}

impl DistError {
    /// A stable category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            DistError::Rendezvous { .. } => "rendezvous",
            DistError::Collective { .. } => "collective",
            DistError::Invalid(_) => "invalid",
        }
    }
}

/// A process group: this process is `rank` of `world`.
pub struct ProcessGroup {
    group: ffi::Group,
    rank: usize,
    world: usize,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl ProcessGroup {
    /// Joins the Gloo group of `world` processes that meet at `host:port` (rank 0 serves the store there). Waits
    /// up to `timeout` for the others; every later collective has the same timeout.
    pub fn gloo(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        if world == 0 || rank >= world {
            return Err(DistError::Invalid(format!(
                "rank {rank} is not in a world of {world}"
            )));
        }
        let c_host =
            CString::new(host).map_err(|_| DistError::Invalid(format!("host {host:?} has a NUL byte")))?;
        let to_int = |n: usize| i32::try_from(n).map_err(|_| DistError::Invalid(format!("{n} is too large")));
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        let group =
            ffi::Group::gloo(&c_host, port, to_int(rank)?, to_int(world)?, ms).map_err(|message| {
                DistError::Rendezvous {
                    addr: format!("{host}:{port}"),
                    rank,
                    world,
                    message,
                }
            })?;
        Ok(Self { group, rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn named(&self, op: &'static str) -> impl FnOnce(String) -> DistError + '_ {
        move |message| DistError::Collective {
            op,
            rank: self.rank,
            message,
        }
    }

    /// Sums `t` over all ranks, in place.
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<(), DistError> {
        self.group.all_reduce_sum(t).map_err(self.named("all_reduce"))
    }

    /// Copies `root`'s `t` into every rank's `t`.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<(), DistError> {
        let root = i32::try_from(root).map_err(|_| DistError::Invalid(format!("root {root}")))?;
        self.group.broadcast(t, root).map_err(self.named("broadcast"))
    }

    /// Concatenates every rank's `input` (the same shape everywhere) into `out`, whose first dimension is `world`
    /// times `input`'s, in rank order.
    pub fn all_gather_into(&self, out: &mut Tensor, input: &Tensor) -> Result<(), DistError> {
        self.group
            .all_gather_into(out, input)
            .map_err(self.named("all_gather"))
    }

    /// Sums `input` (the same shape on every rank, first dimension `world` times `out`'s) over the ranks and leaves
    /// rank r's slice of the sum in `out`.
    pub fn reduce_scatter_sum(&self, out: &mut Tensor, input: &Tensor) -> Result<(), DistError> {
        self.group
            .reduce_scatter_sum(out, input)
            .map_err(self.named("reduce_scatter"))
    }

    /// Waits until every rank gets here.
    pub fn barrier(&self) -> Result<(), DistError> {
        self.group.barrier().map_err(self.named("barrier"))
    }
}
