// The c10d shim: libtorch's TCPStore and ProcessGroupGloo (and, built with USE_C10D_NCCL, ProcessGroupNCCL) behind
// a C ABI for Rust. Every entry point catches C++ exceptions and returns them as a malloc'd message (freed by Rust
// with camelid_c10d_free_error).
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct camelid_work {
  c10::intrusive_ptr<c10d::Work> work;
};

struct camelid_pg {
  c10::intrusive_ptr<c10d::Backend> pg;
  // The CUDA device of an NCCL group (its barrier must name it); -1 for Gloo.
  int device;
};

static int fail(char** err, const char* what) {
  *err = strdup(what);
  return -1;
}

#define GUARD(...)                          \
  try {                                     \
    __VA_ARGS__;                            \
    return 0;                               \
  } catch (const std::exception& e) {       \
    return fail(err, e.what());             \
  } catch (...) {                           \
    return fail(err, "unknown C++ error");  \
  }

extern "C" {

void camelid_c10d_free_error(char* err) { free(err); }

static c10::intrusive_ptr<c10d::TCPStore> make_store(const char* host, uint16_t port, int rank, int world,
                                                     std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = port;
  opts.isServer = rank == 0;
  opts.numWorkers = world;
  opts.waitWorkers = false;
  opts.timeout = timeout;
  return c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
}

int camelid_c10d_gloo(const char* host, uint16_t port, int rank, int world, int64_t timeout_ms, camelid_pg** out,
                      char** err) {
  GUARD({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = make_store(host, port, rank, world, timeout);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new camelid_pg{pg, -1};
  })
}

int camelid_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

int camelid_c10d_nccl(const char* host, uint16_t port, int rank, int world, int64_t timeout_ms, int device,
                      camelid_pg** out, char** err) {
#ifdef USE_C10D_NCCL
  GUARD({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto store = make_store(host, port, rank, world, timeout);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
    *out = new camelid_pg{pg, device};
  })
#else
  (void)host, (void)port, (void)rank, (void)world, (void)timeout_ms, (void)device, (void)out;
  return fail(err, "this build of camelid-c10d has no NCCL (build with the `nccl` feature)");
#endif
}

void camelid_c10d_free(camelid_pg* pg) { delete pg; }

int camelid_c10d_all_reduce_sum(camelid_pg* pg, at::Tensor* t, char** err) {
  GUARD({
    std::vector<at::Tensor> v{*t};
    pg->pg->allreduce(v)->wait();
  })
}

int camelid_c10d_broadcast(camelid_pg* pg, at::Tensor* t, int root, char** err) {
  GUARD({
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    pg->pg->broadcast(v, opts)->wait();
  })
}

int camelid_c10d_all_gather_into(camelid_pg* pg, at::Tensor* out, at::Tensor* in, char** err) {
  GUARD({ pg->pg->_allgather_base(*out, *in)->wait(); })
}

// Starts an all-gather and returns at once; the caller keeps both tensors alive until camelid_c10d_work_wait.
int camelid_c10d_all_gather_start(camelid_pg* pg, at::Tensor* out, at::Tensor* in, camelid_work** work, char** err) {
  GUARD({ *work = new camelid_work{pg->pg->_allgather_base(*out, *in)}; })
}

int camelid_c10d_reduce_scatter_start(camelid_pg* pg, at::Tensor* out, at::Tensor* in, camelid_work** work,
                                      char** err) {
  GUARD({ *work = new camelid_work{pg->pg->_reduce_scatter_base(*out, *in)}; })
}

int camelid_c10d_work_wait(camelid_work* work, char** err) {
  GUARD({ work->work->wait(); })
}

void camelid_c10d_work_free(camelid_work* work) { delete work; }

int camelid_c10d_reduce_scatter_sum(camelid_pg* pg, at::Tensor* out, at::Tensor* in, char** err) {
  GUARD({ pg->pg->_reduce_scatter_base(*out, *in)->wait(); })
}

int camelid_c10d_barrier(camelid_pg* pg, char** err) {
  GUARD({
    c10d::BarrierOptions opts;
    if (pg->device >= 0) {
      opts.device_ids = {static_cast<int64_t>(pg->device)};
    }
    pg->pg->barrier(opts)->wait();
  })
}
}
