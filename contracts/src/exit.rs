//! The trainer's exit codes: the operator tells a preemption from a failure by them.

/// Anything else went wrong; counts against the job's restarts.
pub const FAILED: i32 = 1;
/// Bad arguments, config or data: retrying will not help, so the operator fails the job at once.
pub const INVALID: i32 = 2;
/// Stopped after writing a complete checkpoint (SIGTERM, SIGUSR1, `--stop-at-step`): resume with `--resume auto`.
/// Not a failure (BSD's `EX_TEMPFAIL`).
pub const STOPPED: i32 = 75;
