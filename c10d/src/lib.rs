//! Collectives across processes through libtorch's own c10d: rendezvous on a `TCPStore` (rank 0 serves it), a
//! `ProcessGroupGloo` for CPU tensors (or, built with the `nccl` feature, a `ProcessGroupNCCL` for CUDA tensors),
//! and all-reduce, broadcast, all-gather into one tensor, reduce-scatter and
//! barrier on tch tensors. No collective is written here; the C++ shim (`src/c10d.cpp`) only exposes c10d's.
//!
//! Every call blocks until done, and fails with [`DistError`] when a peer is gone or the timeout passes, so a gang
//! with a dead rank fails fast instead of hanging.

mod ffi;

use std::ffi::CString;
use std::time::Duration;

use tch::{Device, Tensor};

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

/// A collective started with [`ProcessGroup::all_gather_start`] or [`ProcessGroup::reduce_scatter_start`].
/// Dropping it without waiting (an error path) leaves the collective to c10d, which keeps its tensors alive.
pub struct Pending {
    work: ffi::Work,
    op: &'static str,
    rank: usize,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("op", &self.op)
            .field("rank", &self.rank)
            .finish()
    }
}

impl Pending {
    /// Blocks until the collective is done; its output may be read afterwards.
    pub fn wait(self) -> Result<(), DistError> {
        let (op, rank) = (self.op, self.rank);
        self.work
            .wait()
            .map_err(|message| DistError::Collective { op, rank, message })
    }
}

/// A process group: this process is `rank` of `world`.
pub struct ProcessGroup {
    group: ffi::Group,
    rank: usize,
    world: usize,
    device: Device,
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.device)
            .finish()
    }
}

/// Checks the arguments shared by both backends and returns (host, rank, world, timeout in ms) for the shim.
fn shim_args(
    host: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<(CString, i32, i32, i64), DistError> {
    if world == 0 || rank >= world {
        return Err(DistError::Invalid(format!(
            "rank {rank} is not in a world of {world}"
        )));
    }
    let c_host =
        CString::new(host).map_err(|_| DistError::Invalid(format!("host {host:?} has a NUL byte")))?;
    let to_int = |n: usize| i32::try_from(n).map_err(|_| DistError::Invalid(format!("{n} is too large")));
    let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
    Ok((c_host, to_int(rank)?, to_int(world)?, ms))
}

fn rendezvous_error(host: &str, port: u16, rank: usize, world: usize) -> impl FnOnce(String) -> DistError {
    let addr = format!("{host}:{port}");
    move |message| DistError::Rendezvous {
        addr,
        rank,
        world,
        message,
    }
}

impl ProcessGroup {
    /// Joins the Gloo group (CPU tensors) of `world` processes that meet at `host:port` (rank 0 serves the store
    /// there). Waits up to `timeout` for the others; every later collective has the same timeout.
    pub fn gloo(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, DistError> {
        let (c_host, r, w, ms) = shim_args(host, rank, world, timeout)?;
        let group =
            ffi::Group::gloo(&c_host, port, r, w, ms).map_err(rendezvous_error(host, port, rank, world))?;
        Ok(Self {
            group,
            rank,
            world,
            device: Device::Cpu,
        })
    }

    /// Whether this build has NCCL (the `nccl` feature: compiled against CUDA and NCCL headers).
    pub fn has_nccl() -> bool {
        ffi::Group::has_nccl()
    }

    /// Joins the NCCL group (tensors on CUDA device `device`, which becomes the current device) of `world`
    /// processes that meet at `host:port`. Fails with [`DistError::Invalid`] in a build without NCCL.
    pub fn nccl(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
        device: usize,
    ) -> Result<Self, DistError> {
        if !Self::has_nccl() {
            return Err(DistError::Invalid(
                "this build of camelid-c10d has no NCCL: build with `--features nccl` (see c10d/README.md)"
                    .into(),
            ));
        }
        let (c_host, r, w, ms) = shim_args(host, rank, world, timeout)?;
        let d = i32::try_from(device).map_err(|_| DistError::Invalid(format!("device {device}")))?;
        let group = ffi::Group::nccl(&c_host, port, r, w, ms, d)
            .map_err(rendezvous_error(host, port, rank, world))?;
        Ok(Self {
            group,
            rank,
            world,
            device: Device::Cuda(device),
        })
    }

    /// Where this group's tensors must live: the CPU for Gloo, the group's GPU for NCCL.
    pub fn device(&self) -> Device {
        self.device
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

    /// Starts [`ProcessGroup::all_gather_into`] and returns at once, so the caller can compute while it runs;
    /// `out` must not be read before [`Pending::wait`].
    pub fn all_gather_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        let work = self
            .group
            .all_gather_start(out, input)
            .map_err(self.named("all_gather"))?;
        Ok(Pending {
            work,
            op: "all_gather",
            rank: self.rank,
        })
    }

    /// Starts [`ProcessGroup::reduce_scatter_sum`] and returns at once; as [`ProcessGroup::all_gather_start`].
    pub fn reduce_scatter_start(&self, out: &Tensor, input: &Tensor) -> Result<Pending, DistError> {
        let work = self
            .group
            .reduce_scatter_start(out, input)
            .map_err(self.named("reduce_scatter"))?;
        Ok(Pending {
            work,
            op: "reduce_scatter",
            rank: self.rank,
        })
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
