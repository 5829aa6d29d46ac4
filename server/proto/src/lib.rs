//! The worker ↔ gateway contract: `camelid.worker.v1.Worker` (`Generate` server-streaming, `Health`,
//! `ModelInfo`). Generated code lives in `OUT_DIR`; see `proto/worker.proto` for the meaning of each field.

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("camelid.worker.v1");
}

/// gRPC metadata key carrying an OpenAI error code (`context_length_exceeded`, ...) on a failed `Generate`.
pub const ERROR_CODE_KEY: &str = "camelid-error-code";
/// gRPC metadata key naming the request field an `InvalidArgument` is about.
pub const ERROR_PARAM_KEY: &str = "camelid-error-param";
