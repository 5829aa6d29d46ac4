// The c10d shim: libtorch's TCPStore and ProcessGroupGloo behind a C ABI for Rust. Every entry point catches C++
// exceptions and returns them as a malloc'd message (freed by Rust with camelid_c10d_free_error).
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct camelid_pg {
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

static int fail(char** err, const char* what) {
  *err = strdup(what);
  return -1;
}

#define GUARD(body)                         \
  try {                                     \
    body;                                   \
    return 0;                               \
  } catch (const std::exception& e) {       \
    return fail(err, e.what());             \
  } catch (...) {                           \
    return fail(err, "unknown C++ error");  \
  }

extern "C" {

void camelid_c10d_free_error(char* err) { free(err); }

int camelid_c10d_gloo(const char* host, uint16_t port, int rank, int world, int64_t timeout_ms, camelid_pg** out,
                      char** err) {
  GUARD({
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    *out = new camelid_pg{pg};
  })
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

int camelid_c10d_reduce_scatter_sum(camelid_pg* pg, at::Tensor* out, at::Tensor* in, char** err) {
  GUARD({ pg->pg->_reduce_scatter_base(*out, *in)->wait(); })
}

int camelid_c10d_barrier(camelid_pg* pg, char** err) {
  GUARD({ pg->pg->barrier()->wait(); })
}
}
