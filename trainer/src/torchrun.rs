//! Which process of which gang this is, from torchrun's environment, and the few collectives the training loop
//! itself needs (agreeing to stop, summing the loss, waiting for each other).
//!
//! The environment is torchrun's: `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`. A
//! Kubernetes Indexed Job gives each pod `JOB_COMPLETION_INDEX` instead of a rank: with one process per pod it
//! is the rank; with `NPROC_PER_NODE` processes per pod (`camelid-trainer launch`) the rank is
//! `index * NPROC_PER_NODE + LOCAL_RANK`. A world of one (or no `WORLD_SIZE`) trains in this process alone.

use std::time::Duration;

use camelid_c10d::ProcessGroup;
use tch::{Device, Tensor};

use crate::error::TrainError;

/// Default for `CAMELID_DIST_TIMEOUT_SECONDS`: how long rendezvous and every collective may wait for the others
/// (a dead peer is usually noticed at once, as a closed connection; a hung one within this).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The variable `name` as a non-negative integer (`None` when unset or empty).
pub(crate) fn env_number(var: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>, String> {
    var(name)
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("{name}={v:?} is not a non-negative integer"))
        })
        .transpose()
}

/// A variable lookup over `pairs`, for tests.
#[cfg(test)]
pub(crate) fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: std::collections::HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

/// This process's place in the gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    pub timeout: Duration,
}

impl DistEnv {
    /// Reads the gang from `var` (the process environment in production). `None` for a world of one.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, TrainError> {
        let number = |name: &str| env_number(&var, name).map_err(TrainError::Config);
        let world = number("WORLD_SIZE")?.unwrap_or(1);
        if world == 0 {
            return Err(TrainError::Config(
                "WORLD_SIZE=0: a gang needs at least one process".into(),
            ));
        }
        if world == 1 {
            return Ok(None);
        }
        let local_rank = number("LOCAL_RANK")?.unwrap_or(0);
        let rank = match (number("RANK")?, number("JOB_COMPLETION_INDEX")?) {
            (Some(rank), _) => rank,
            (None, Some(index)) => index * number("NPROC_PER_NODE")?.unwrap_or(1) + local_rank,
            (None, None) => {
                return Err(TrainError::Config(format!(
                    "WORLD_SIZE={world} but neither RANK nor JOB_COMPLETION_INDEX is set: start the ranks with \
                     `camelid-trainer launch` or torchrun's environment"
                )));
            }
        };
        if rank >= world {
            return Err(TrainError::Config(format!(
                "RANK={rank} is not below WORLD_SIZE={world}"
            )));
        }
        let master_addr = var("MASTER_ADDR").filter(|v| !v.is_empty()).ok_or_else(|| {
            TrainError::Config(format!(
                "WORLD_SIZE={world} needs MASTER_ADDR (where rank 0 listens)"
            ))
        })?;
        let master_port = match var("MASTER_PORT") {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| TrainError::Config(format!("MASTER_PORT={p:?} is not a port number")))?,
            None => 29500,
        };
        let timeout = match number("CAMELID_DIST_TIMEOUT_SECONDS")? {
            Some(0) | None => DEFAULT_TIMEOUT,
            Some(s) => Duration::from_secs(s as u64),
        };
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            timeout,
        }))
    }

    /// Joins the gang (waits for every rank, up to the timeout): Gloo for a model on the CPU, NCCL on this
    /// rank's GPU (`LOCAL_RANK`) for a model on CUDA.
    pub fn connect(&self, device: Device) -> Result<ProcessGroup, TrainError> {
        tracing::info!(
            rank = self.rank, world = self.world, master = %format!("{}:{}", self.master_addr, self.master_port),
            ?device, "joining the process group"
        );
        let (addr, port, rank, world) = (&self.master_addr, self.master_port, self.rank, self.world);
        Ok(match device {
            Device::Cpu => ProcessGroup::gloo(addr, port, rank, world, self.timeout)?,
            _ if !ProcessGroup::has_nccl() => {
                return Err(TrainError::Config(format!(
                    "WORLD_SIZE={world} on {device:?}: this build of camelid-trainer has no NCCL process group \
                     (build it with `--features nccl`, see c10d/README.md), and Gloo does not shard CUDA tensors"
                )));
            }
            _ => ProcessGroup::nccl(addr, port, rank, world, self.timeout, self.local_rank)?,
        })
    }
}

/// The training loop's own collectives; every one is a no-op for a single process.
#[derive(Debug, Default)]
pub struct Comm {
    pub group: Option<std::rc::Rc<ProcessGroup>>,
}

impl Comm {
    pub fn rank(&self) -> usize {
        self.group.as_ref().map_or(0, |g| g.rank())
    }

    pub fn world(&self) -> usize {
        self.group.as_ref().map_or(1, |g| g.world())
    }

    pub fn is_leader(&self) -> bool {
        self.rank() == 0
    }

    /// Sums `values` over the ranks (f64, on the CPU).
    pub fn sum(&self, values: &[f64]) -> Result<Vec<f64>, TrainError> {
        let Some(group) = &self.group else {
            return Ok(values.to_vec());
        };
        let mut t = Tensor::f_from_slice(values)?.f_to_device(group.device())?;
        group.all_reduce_sum(&mut t)?;
        Ok(Vec::<f64>::try_from(&t.f_to_device(Device::Cpu)?)?)
    }

    /// Whether any rank says yes (a stop requested on one rank stops them all at the same micro-batch).
    pub fn any(&self, flag: bool) -> Result<bool, TrainError> {
        Ok(self.sum(&[f64::from(u8::from(flag))])?[0] > 0.0)
    }

    pub fn barrier(&self) -> Result<(), TrainError> {
        match &self.group {
            Some(group) => Ok(group.barrier()?),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vars as env;

    #[test]
    fn no_world_or_a_world_of_one_trains_alone() {
        assert_eq!(DistEnv::from_vars(env(&[])).unwrap(), None);
        assert_eq!(
            DistEnv::from_vars(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
            None
        );
    }

    #[test]
    fn torchrun_variables_give_the_rank() {
        let d = DistEnv::from_vars(env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "job-0.svc"),
            ("MASTER_PORT", "29501"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((d.rank, d.world, d.local_rank), (3, 4, 1));
        assert_eq!((d.master_addr.as_str(), d.master_port), ("job-0.svc", 29501));
        assert_eq!(d.timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn an_indexed_job_pod_takes_its_completion_index() {
        let one_per_pod = env(&[
            ("WORLD_SIZE", "2"),
            ("JOB_COMPLETION_INDEX", "1"),
            ("MASTER_ADDR", "a"),
        ]);
        assert_eq!(DistEnv::from_vars(one_per_pod).unwrap().unwrap().rank, 1);
        let two_per_pod = env(&[
            ("WORLD_SIZE", "4"),
            ("JOB_COMPLETION_INDEX", "1"),
            ("NPROC_PER_NODE", "2"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "a"),
        ]);
        assert_eq!(DistEnv::from_vars(two_per_pod).unwrap().unwrap().rank, 3);
    }

    #[test]
    fn a_broken_environment_is_named() {
        let err = |pairs: &[(&str, &str)]| DistEnv::from_vars(env(pairs)).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE=\"two\""));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")])
                .contains("neither RANK nor JOB_COMPLETION_INDEX")
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a")]).contains("not below"));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "0")]).contains("MASTER_ADDR"));
        assert!(
            err(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "0"),
                ("MASTER_ADDR", "a"),
                ("MASTER_PORT", "x")
            ])
            .contains("MASTER_PORT")
        );
    }
}
