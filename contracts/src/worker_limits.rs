//! The most one generate request may ask of a worker, whoever sends it. The gateway checks its own (configurable,
//! usually tighter) limits first and never sends more than these; a worker checks them again because its gRPC port
//! is reachable by more than the gateway (another pod, a misconfigured NetworkPolicy, a tenant's token), and a
//! worker that trusted its caller could be made to tokenize gigabytes or scan every output for thousands of stop
//! strings.

/// Messages in one chat request.
pub const MAX_MESSAGES: usize = 4096;
/// Bytes of all messages' contents (or of the prompt) together.
pub const MAX_PROMPT_BYTES: usize = 4 << 20;
/// Bytes of one message's role (`system`, `user`, `assistant`, or a template's own).
pub const MAX_ROLE_BYTES: usize = 64;
/// Stop sequences in one request.
pub const MAX_STOP_SEQUENCES: usize = 16;
/// Bytes of one stop sequence: every step scans the output's tail for each, so a long one costs every step.
pub const MAX_STOP_BYTES: usize = 256;
/// Token ids in a continuation (prompt and generated together): more than any model's context.
pub const MAX_CONTINUATION_TOKENS: usize = 1 << 20;
/// Bytes of the request id that logs and spans carry.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// The largest gRPC message a worker decodes: the prompt plus room for the rest of the request.
pub const MAX_REQUEST_BYTES: usize = MAX_PROMPT_BYTES + (1 << 20);
