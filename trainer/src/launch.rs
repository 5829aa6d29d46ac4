//! `camelid-trainer launch --nproc N -- train ...`: starts N ranks on this machine (or this pod) with torchrun's
//! environment and supervises them as one gang.
//!
//! The launcher forwards SIGTERM and SIGUSR1 to every rank (they agree on one coordinated checkpoint and exit
//! with 75). When a rank fails, the others notice through their next collective and exit on their own with an
//! error naming it; whatever is still running after the grace period is killed. The exit code is 0 when every rank
//! finished, 75 when every rank stopped after a checkpoint, and otherwise the first failing rank's code.

use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use camelid_contracts::exit;

/// Where this node's ranks sit in the gang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub nproc: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Intra-op threads per rank (`OMP_NUM_THREADS`), unless the environment already sets them.
    pub threads_per_rank: usize,
}

impl Plan {
    /// Reads the node's place from the environment the operator sets (`NNODES`, and `NODE_RANK` or an Indexed
    /// Job's `JOB_COMPLETION_INDEX`, `MASTER_ADDR`, `MASTER_PORT`), with one local node by default.
    pub fn from_vars(
        nproc: usize,
        master_port: Option<u16>,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        if nproc == 0 {
            return Err("--nproc must be at least 1".into());
        }
        let number = |name: &str| crate::torchrun::env_number(&var, name);
        let nnodes = number("NNODES")?.unwrap_or(1).max(1);
        let node_rank = match number("NODE_RANK")? {
            Some(n) => n,
            None => number("JOB_COMPLETION_INDEX")?.unwrap_or(0),
        };
        if node_rank >= nnodes {
            return Err(format!("node rank {node_rank} is not below NNODES={nnodes}"));
        }
        if let Some(world) = number("WORLD_SIZE")?
            && world != nnodes * nproc
        {
            return Err(format!(
                "WORLD_SIZE={world} but NNODES={nnodes} x --nproc {nproc} = {}",
                nnodes * nproc
            ));
        }
        let master_port = match master_port {
            Some(p) => p,
            None => match var("MASTER_PORT") {
                Some(p) => p
                    .trim()
                    .parse()
                    .map_err(|_| format!("MASTER_PORT={p:?} is not a port"))?,
                None => 29500,
            },
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            nproc,
            nnodes,
            node_rank,
            master_addr: var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
            master_port,
            threads_per_rank: (cores / nproc).max(1),
        })
    }

    pub fn world(&self) -> usize {
        self.nnodes * self.nproc
    }

    /// The variables local rank `local` gets (torchrun's names).
    pub fn rank_env(&self, local: usize) -> Vec<(String, String)> {
        let rank = self.node_rank * self.nproc + local;
        [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("WORLD_SIZE", self.world().to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc.to_string()),
            ("NNODES", self.nnodes.to_string()),
            ("NPROC_PER_NODE", self.nproc.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    let _ = rustix::process::kill_process(rustix::process::Pid::from_child(child), sig);
}

/// Starts `program args` once per local rank and supervises them (see the module docs); returns the exit code.
pub fn run(plan: &Plan, program: &Path, args: &[String], stop: &Arc<AtomicBool>, grace: Duration) -> i32 {
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(plan.nproc);
    for local in 0..plan.nproc {
        let mut command = Command::new(program);
        command.args(args).envs(plan.rank_env(local));
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            command.env("OMP_NUM_THREADS", plan.threads_per_rank.to_string());
        }
        match command.spawn() {
            Ok(child) => children.push((local, child)),
            Err(e) => {
                eprintln!("launch: cannot start rank {local} ({}): {e}", program.display());
                for (_, child) in &mut children {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                return exit::FAILED;
            }
        }
    }
    tracing::info!(ranks = plan.nproc, world = plan.world(), "launched");
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    let mut first_failure: Option<(usize, i32)> = None;
    let mut forwarded = false;
    let mut failed_at: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) && !forwarded {
            forwarded = true;
            for (i, (_, child)) in children.iter().enumerate() {
                if codes[i].is_none() {
                    signal(child, rustix::process::Signal::TERM);
                }
            }
        }
        for (i, (local, child)) in children.iter_mut().enumerate() {
            if codes[i].is_some() {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Killed by a signal: report it as a failure.
                let code = status.code().unwrap_or(exit::FAILED);
                codes[i] = Some(code);
                if code != 0 && code != exit::STOPPED && first_failure.is_none() {
                    eprintln!(
                        "launch: rank {} exited with {code}; waiting for the others",
                        *local
                    );
                    first_failure = Some((*local, code));
                    failed_at = Some(Instant::now());
                }
            }
        }
        if codes.iter().all(Option::is_some) {
            break;
        }
        if failed_at.is_some_and(|t| t.elapsed() > grace) {
            for (i, (local, child)) in children.iter_mut().enumerate() {
                if codes[i].is_none() {
                    eprintln!("launch: rank {local} is still running {grace:?} after a failure; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    codes[i] = Some(exit::FAILED);
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match first_failure {
        Some((_, code)) => code,
        None if codes.iter().all(|c| *c == Some(0)) => 0,
        None if codes.iter().all(|c| *c == Some(exit::STOPPED)) => exit::STOPPED,
        // Some finished and some stopped: not a state a gang should reach; resume sorts it out.
        None => exit::FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::torchrun::vars as env;

    fn lookup(vars: &[(String, String)], key: &str) -> String {
        vars.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap()
    }

    #[test]
    fn one_machine_gets_local_ranks_and_a_local_master() {
        let plan = Plan::from_vars(2, Some(29600), env(&[])).unwrap();
        assert_eq!(plan.world(), 2);
        let vars = plan.rank_env(1);
        assert_eq!(lookup(&vars, "RANK"), "1");
        assert_eq!(lookup(&vars, "WORLD_SIZE"), "2");
        assert_eq!(lookup(&vars, "MASTER_ADDR"), "127.0.0.1");
        assert_eq!(lookup(&vars, "MASTER_PORT"), "29600");
    }

    #[test]
    fn an_indexed_job_pod_numbers_its_ranks_after_its_index() {
        let operator_env = env(&[
            ("NNODES", "3"),
            ("JOB_COMPLETION_INDEX", "2"),
            ("WORLD_SIZE", "12"),
            ("MASTER_ADDR", "job-0.job"),
            ("MASTER_PORT", "29500"),
        ]);
        let plan = Plan::from_vars(4, None, operator_env).unwrap();
        let vars = plan.rank_env(3);
        assert_eq!(lookup(&vars, "RANK"), "11");
        assert_eq!(lookup(&vars, "LOCAL_RANK"), "3");
        assert_eq!(lookup(&vars, "MASTER_ADDR"), "job-0.job");
    }

    #[test]
    fn an_inconsistent_environment_is_refused() {
        let err = Plan::from_vars(4, None, env(&[("NNODES", "2"), ("WORLD_SIZE", "6")])).unwrap_err();
        assert!(err.contains("WORLD_SIZE=6"), "{err}");
        let err = Plan::from_vars(1, None, env(&[("NNODES", "2"), ("NODE_RANK", "2")])).unwrap_err();
        assert!(err.contains("not below"), "{err}");
        assert!(Plan::from_vars(0, None, env(&[])).is_err());
    }
}
