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
/// The [`ERROR_CODE_KEY`] of an `Unavailable` from a worker that is draining (it admits nothing more).
pub const DRAINING_CODE: &str = "draining";

/// A whole answer as the three events a worker streams (`Started`, one `Chunk`, `Finished`): what fake workers in
/// tests and benches send, so that each speaks the protocol the same way.
pub fn whole_answer(
    text: &str,
    completion_tokens: u32,
    reason: v1::FinishReason,
) -> Vec<v1::GenerateResponse> {
    use v1::generate_response::Event;
    [
        Event::Started(v1::Started {
            prompt_tokens: 1,
            prompt_token_ids: vec![1],
        }),
        Event::Chunk(v1::Chunk {
            text: text.into(),
            tokens: completion_tokens,
            token_ids: vec![0; completion_tokens as usize],
        }),
        Event::Finished(v1::Finished {
            reason: reason as i32,
            prompt_tokens: 1,
            completion_tokens,
        }),
    ]
    .into_iter()
    .map(|e| v1::GenerateResponse { event: Some(e) })
    .collect()
}

/// The health of a worker that is ready and idle.
pub fn ready_and_idle() -> v1::HealthResponse {
    v1::HealthResponse {
        ready: true,
        running: 0,
        waiting: 0,
    }
}
