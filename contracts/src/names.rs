//! Labels, annotations, ports and port names that one process writes and another selects or dials.

/// On every trainer child and pod: the FineTuneJob it belongs to.
pub const FINETUNEJOB_LABEL: &str = "camelid.dev/finetunejob";
/// On trainer pods: the attempt (gang) number.
pub const ATTEMPT_LABEL: &str = "camelid.dev/attempt";
/// On trainer and worker pods: `spot` or `on-demand`.
pub const CAPACITY_LABEL: &str = "camelid.dev/capacity";
/// Ties workers, their Service and its EndpointSlices to their ChatModel; the gateway routes by it.
pub const CHATMODEL_LABEL: &str = "camelid.dev/chatmodel";
/// Which Deployment a worker belongs to: `base` (`NAME-worker`) or `spot` (`NAME-worker-spot`).
pub const POOL_LABEL: &str = "camelid.dev/pool";
/// The worker pod template annotation that changes (and so rolls the workers) when the model's files change.
pub const REVISION_ANNOTATION: &str = "camelid.dev/model-revision";

/// `app.kubernetes.io/name` of everything camelid runs.
pub const APP_NAME: &str = "camelid";
/// `app.kubernetes.io/managed-by` of what the operator creates.
pub const MANAGER: &str = "camelid-operator";

/// The workers' gRPC port and its name on Services and EndpointSlices.
pub const WORKER_GRPC_PORT: u16 = 50051;
pub const WORKER_GRPC_PORT_NAME: &str = "grpc";
/// The workers' `/metrics`, `/healthz` and `/readyz`.
pub const WORKER_HTTP_PORT: u16 = 9090;
pub const WORKER_HTTP_PORT_NAME: &str = "http";
/// The trainer's `/progress`, `/metrics` and `/healthz`.
pub const TRAINER_PROGRESS_PORT: u16 = 8090;
pub const TRAINER_PROGRESS_PORT_NAME: &str = "progress";
/// The gang's rendezvous (rank 0's TCPStore; torchrun's default `MASTER_PORT`).
pub const RENDEZVOUS_PORT: u16 = 29500;
pub const RENDEZVOUS_PORT_NAME: &str = "rendezvous";
/// The gateway's OpenAI API by default (`camelid-gateway`, `camelid serve`), and its port
/// name on the gateway Service, which the operator looks up.
pub const GATEWAY_PORT: u16 = 8000;
pub const GATEWAY_PORT_NAME: &str = "http";
/// The gateway's admin endpoints (`/metrics`, `/internal/load`, `/healthz`, `/readyz`), apart from the API so
/// that clients never see key names, endpoints or other tenants' models; the operator reads `/internal/load`
/// through this port name on the gateway Service's EndpointSlices.
pub const GATEWAY_ADMIN_PORT: u16 = 9091;
pub const GATEWAY_ADMIN_PORT_NAME: &str = "admin";

/// Node taints that announce a spot termination (GKE, AWS node-termination-handler, Karpenter, Kubernetes' own
/// out-of-service, and AKS's spot eviction): the operator restarts a gang away from such nodes, the gateway stops
/// routing to workers on them.
pub const TERMINATION_TAINTS: [&str; 5] = [
    "cloud.google.com/impending-node-termination",
    "aws-node-termination-handler/spot-itn",
    "karpenter.sh/disrupted",
    "node.kubernetes.io/out-of-service",
    "kubernetes.azure.com/scalesetpriority-eviction",
];

/// `app.kubernetes.io/component` of a FineTuneJob's evaluation Job and its pod (the trainers' is `trainer`).
pub const EVALUATION_COMPONENT: &str = "evaluation";
/// On a `Rejected` FineTuneJob, `"true"` serves its model anyway: the operator publishes its ChatModel.
pub const PROMOTE_ANNOTATION: &str = "camelid.dev/promote";
