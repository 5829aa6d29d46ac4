//! Where requests go, in four parts: endpoint sources ([`endpoints`]: the config's static endpoints and, in a
//! cluster, ChatModels' EndpointSlices, merged), the balancing [`router`] (per-model backends, health probes,
//! ejection; the choice itself is [`affinity`]'s prefix-aware consistent hashing with bounded load), [`hold`]ing requests for a model with no ready worker (at zero replicas, or
//! while one starts) until one is, the gRPC [`generate`] call with retries on another worker while nothing has
//! been sent, and the [`generation`] that continues on another worker when its own drains or dies. The names callers use are re-exported here.

pub mod adapters;
pub mod affinity;
pub mod auth;
pub mod endpoints;
pub mod generate;
pub mod generation;
pub mod hold;
pub mod router;

pub use auth::WorkerSecret;
pub use endpoints::{EndpointSource, Endpoints, StaticEndpoints, merge};
pub use generate::is_transport_failure;
pub use generation::{Generation, MigrationLimits, Next};
pub use hold::{Held, HoldLimits};
pub use router::{Backend, InFlight, Router};
