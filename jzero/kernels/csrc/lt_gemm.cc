// cuBLASLt GEMMs with the GELU epilogues, as XLA FFI handlers (jzero.kernels.gelu_gemm builds and loads this).
//
// XLA (jax 0.11.2) never asks cuBLASLt for its GELU epilogues in GPT-2's MLP, so the bias + GELU of the fc layer
// and GELU's derivative in the backward pass run as separate HBM passes over [tokens, d_ff] arrays. These two
// handlers do them inside the GEMM:
//
//   jzero_gemm_bias_gelu  x [M, K], w [K, N], b [N]      -> out = gelu(x @ w + b) [M, N], pre = x @ w + b [M, N]
//   jzero_gemm_dgelu      dy [M, K], w [N, K], pre [M, N] -> dpre = (dy @ w^T) * gelu'(pre) [M, N]
//
// All arrays are row-major bf16 or fp16 (one dtype per call), fp32 accumulation. cuBLASLt is column-major, so a
// row-major C[M, N] = A[M, K] @ B[K, N] is computed as the column-major C^T[N, M] = B^T[N, K] @ A^T[K, M]: the
// weight is cuBLASLt's A and the activations its B, and its per-row bias / aux run over our N.
// GELU is the tanh approximation (cuBLASLt's only one), which is GPT-2's. Each handler's last result is a
// workspace buffer for cuBLASLt.
//
// The algorithm for each (GPU, cuBLASLt version, epilogue, shape, dtype, workspace) is chosen without timing, so
// that every run and every rank computes the same bits: the candidate index a choice file records for it (lines
// "<key> <index>", loaded by JzeroLtLoad; a later line wins), else the heuristic's first candidate. With
// autotuning on (JzeroLtSetup; jzero's JZERO_LT_AUTOTUNE=1) an unrecorded problem times the heuristic's
// candidates on its first call's operands instead and appends the fastest to the record file: run that once, in
// one process (timings differ between ranks), then every later run and rank reads the same choice. The handlers
// read no environment and use C stdio only: an earlier version that called getenv in the handler and used
// iostreams segfaulted inside an XLA step (which of the two was not isolated; BENCHMARKS.md, sessions 6-7).

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <cstring>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Check(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("jzero lt_gemm: ") + what + " failed: " +
                              cublasLtGetStatusString(status));
}

#define JZ_CHECK(expr, what)                       \
  do {                                             \
    ffi::Error err_ = Check((expr), (what));       \
    if (err_.failure()) return err_;               \
  } while (0)

cublasStatus_t Handle(cublasLtHandle_t* out) {
  static cublasLtHandle_t handle = nullptr;
  static cublasStatus_t status = cublasLtCreate(&handle);
  *out = handle;
  return status;
}

// One GEMM in cuBLASLt's column-major terms: D[m, n] = op(A)[m, k] @ B[k, n], then the epilogue.
struct Problem {
  cublasLtEpilogue_t epilogue;
  bool trans_a;  // A stored [k, m] (transposed) rather than [m, k]
  int64_t m, n, k;
  cudaDataType_t dtype;
};

using Key = std::tuple<int, bool, int64_t, int64_t, int64_t, int, size_t>;

std::mutex cache_mutex;   // guards everything below
std::map<Key, cublasLtMatmulAlgo_t> algo_cache;
std::map<std::string, int> recorded;   // choice-file key -> heuristic candidate index
std::string record_path;               // where autotuned choices are appended ("" = nowhere)
bool autotune = false, verbose = false;
std::map<int, std::string> device_names;   // CUDA device ordinal -> "<name>_sm<count>", spaces as '_'

// "<device> <cublasLt version> <epilogue> <trans_a> <m> <n> <k> <dtype> <workspace>": no spaces inside a field.
std::string ChoiceKey(const Key& key) {
  int dev = 0;
  cudaGetDevice(&dev);
  auto it = device_names.find(dev);
  if (it == device_names.end()) {
    cudaDeviceProp prop;
    std::string name = "unknown";
    if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess) {
      name = std::string(prop.name) + "_sm" + std::to_string(prop.multiProcessorCount);
      for (char& c : name) if (c == ' ') c = '_';
    }
    it = device_names.emplace(dev, name).first;
  }
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s %zu %d %d %lld %lld %lld %d %zu", it->second.c_str(),
                static_cast<size_t>(cublasLtGetVersion()), std::get<0>(key), std::get<1>(key) ? 1 : 0,
                static_cast<long long>(std::get<2>(key)), static_cast<long long>(std::get<3>(key)),
                static_cast<long long>(std::get<4>(key)), std::get<5>(key), std::get<6>(key));
  return buf;
}

void Record(const std::string& key, int index) {
  recorded[key] = index;
  if (record_path.empty()) return;
  FILE* f = std::fopen(record_path.c_str(), "a");   // one short line per problem: appends do not interleave
  if (f == nullptr) {
    std::fprintf(stderr, "jzero lt_gemm: cannot append to %s; the choice holds for this process only\n",
                 record_path.c_str());
    return;
  }
  std::fprintf(f, "%s %d\n", key.c_str(), index);
  std::fclose(f);
}

// RAII for the per-call descriptors (creating them is host-only and takes microseconds).
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

constexpr int kCandidates = 16;

// Time each candidate algorithm of the heuristic on the real operands (once per shape; the call's own
// result is written again afterwards) and pick the fastest (autotuning only).
ffi::Error Autotune(cublasLtHandle_t handle, cudaStream_t stream, const Descriptors& desc,
                    const cublasLtMatmulHeuristicResult_t* results, int found, const void* a, const void* b,
                    void* d, void* workspace, size_t workspace_bytes, const Problem& p, int* best) {
  const float alpha = 1.0f, beta = 0.0f;
  cudaEvent_t start, stop;
  if (cudaEventCreate(&start) != cudaSuccess || cudaEventCreate(&stop) != cudaSuccess) {
    return ffi::Error::Internal("jzero lt_gemm: cudaEventCreate failed");
  }
  float best_ms = -1.0f;
  for (int i = 0; i < found; ++i) {
    auto run = [&] {
      return cublasLtMatmul(handle, desc.op, &alpha, a, desc.a, b, desc.b, &beta, d, desc.d, d, desc.d,
                            &results[i].algo, workspace, workspace_bytes, stream);
    };
    if (results[i].state != CUBLAS_STATUS_SUCCESS || run() != CUBLAS_STATUS_SUCCESS) continue;
    cudaEventRecord(start, stream);
    bool ok = true;
    for (int r = 0; r < 5 && ok; ++r) ok = run() == CUBLAS_STATUS_SUCCESS;
    cudaEventRecord(stop, stream);
    float ms = 0.0f;
    if (!ok || cudaEventSynchronize(stop) != cudaSuccess || cudaEventElapsedTime(&ms, start, stop) != cudaSuccess) {
      continue;
    }
    ms /= 5;
    if (verbose) {
      std::fprintf(stderr, "jzero lt_gemm epilogue %d m=%lld n=%lld k=%lld: candidate %d %.4f ms\n",
                   static_cast<int>(p.epilogue), static_cast<long long>(p.m), static_cast<long long>(p.n),
                   static_cast<long long>(p.k), i, ms);
    }
    if (best_ms < 0 || ms < best_ms) {
      best_ms = ms;
      *best = i;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (best_ms < 0) return ffi::Error::Internal("jzero lt_gemm: no cuBLASLt candidate algorithm ran");
  return ffi::Error::Success();
}

ffi::Error Run(cudaStream_t stream, const Problem& p, const void* a, const void* b, void* d, void* bias,
               void* aux, void* workspace, size_t workspace_bytes) {
  cublasLtHandle_t handle;
  JZ_CHECK(Handle(&handle), "cublasLtCreate");
  Descriptors desc;
  JZ_CHECK(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  cublasOperation_t op_a = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  int64_t ld = p.m;
  auto set = [&](cublasLtMatmulDescAttributes_t attr, const void* value, size_t size) {
    return cublasLtMatmulDescSetAttribute(desc.op, attr, value, size);
  };
  JZ_CHECK(set(CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)), "set TRANSA");
  JZ_CHECK(set(CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)), "set TRANSB");
  JZ_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE, &p.epilogue, sizeof(p.epilogue)), "set EPILOGUE");
  if (bias != nullptr) {
    JZ_CHECK(set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), "set BIAS_POINTER");
    JZ_CHECK(set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &p.dtype, sizeof(p.dtype)), "set BIAS_DATA_TYPE");
  }
  if (aux != nullptr) {
    JZ_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)), "set EPILOGUE_AUX_POINTER");
    JZ_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof(ld)), "set EPILOGUE_AUX_LD");
    JZ_CHECK(set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &p.dtype, sizeof(p.dtype)),
             "set EPILOGUE_AUX_DATA_TYPE");
  }
  if (p.trans_a) {
    JZ_CHECK(cublasLtMatrixLayoutCreate(&desc.a, p.dtype, p.k, p.m, p.k), "layout A");
  } else {
    JZ_CHECK(cublasLtMatrixLayoutCreate(&desc.a, p.dtype, p.m, p.k, p.m), "layout A");
  }
  JZ_CHECK(cublasLtMatrixLayoutCreate(&desc.b, p.dtype, p.k, p.n, p.k), "layout B");
  JZ_CHECK(cublasLtMatrixLayoutCreate(&desc.d, p.dtype, p.m, p.n, p.m), "layout D");

  Key key{static_cast<int>(p.epilogue), p.trans_a, p.m, p.n, p.k, static_cast<int>(p.dtype), workspace_bytes};
  cublasLtMatmulAlgo_t algo;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = algo_cache.find(key);
    if (it != algo_cache.end()) {
      algo = it->second;
    } else {
      JZ_CHECK(cublasLtMatmulPreferenceCreate(&desc.pref), "cublasLtMatmulPreferenceCreate");
      uint64_t ws = workspace_bytes;
      JZ_CHECK(cublasLtMatmulPreferenceSetAttribute(desc.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                                    sizeof(ws)),
               "set MAX_WORKSPACE_BYTES");
      cublasLtMatmulHeuristicResult_t results[kCandidates];
      int found = 0;
      JZ_CHECK(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d, desc.pref,
                                              kCandidates, results, &found),
               "cublasLtMatmulAlgoGetHeuristic");
      if (found == 0) {
        return ffi::Error::Internal("jzero lt_gemm: cuBLASLt has no algorithm for epilogue " +
                                    std::to_string(static_cast<int>(p.epilogue)) + " at m=" +
                                    std::to_string(p.m) + " n=" + std::to_string(p.n) + " k=" +
                                    std::to_string(p.k) + "; run with JZERO_KERNELS=layer_norm,cross_entropy");
      }
      const std::string choice = ChoiceKey(key);
      auto rec = recorded.find(choice);
      int index = rec == recorded.end() ? -1 : rec->second;
      const char* how = "recorded";
      if (index < 0 && autotune) {
        ffi::Error err = Autotune(handle, stream, desc, results, found, a, b, d, workspace, workspace_bytes, p,
                                  &index);
        if (err.failure()) return err;
        Record(choice, index);
        how = "autotuned";
      }
      if (index < 0 || index >= found || results[index].state != CUBLAS_STATUS_SUCCESS) {
        index = 0;
        how = "heuristic";
      }
      if (verbose) std::fprintf(stderr, "jzero lt_gemm %s: candidate %d of %d (%s)\n", choice.c_str(), index, found, how);
      algo = results[index].algo;
      algo_cache.emplace(key, algo);
    }
  }
  const float alpha = 1.0f, beta = 0.0f;
  JZ_CHECK(cublasLtMatmul(handle, desc.op, &alpha, a, desc.a, b, desc.b, &beta, d, desc.d, d, desc.d, &algo,
                          workspace, workspace_bytes, stream),
           "cublasLtMatmul");
  return ffi::Error::Success();
}

ffi::Error DataType(ffi::DataType t, cudaDataType_t* out) {
  if (t == ffi::DataType::BF16) {
    *out = CUDA_R_16BF;
  } else if (t == ffi::DataType::F16) {
    *out = CUDA_R_16F;
  } else {
    return ffi::Error::InvalidArgument("jzero lt_gemm: arrays must be bfloat16 or float16");
  }
  return ffi::Error::Success();
}

int64_t Dim(const ffi::AnyBuffer& buf, int i) { return buf.dimensions()[i]; }

// x [M, K], w [K, N], b [N] -> out [M, N] = gelu(x @ w + b), pre [M, N] = x @ w + b.
ffi::Error GemmBiasGelu(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer b,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> pre,
                        ffi::Result<ffi::AnyBuffer> workspace) {
  if (x.dimensions().size() != 2 || w.dimensions().size() != 2 || Dim(x, 1) != Dim(w, 0) ||
      b.element_count() != static_cast<size_t>(Dim(w, 1))) {
    return ffi::Error::InvalidArgument("jzero_gemm_bias_gelu: expected x [M, K], w [K, N], b [N]");
  }
  Problem p{CUBLASLT_EPILOGUE_GELU_AUX_BIAS, false, Dim(w, 1), Dim(x, 0), Dim(x, 1), CUDA_R_16BF};
  ffi::Error err = DataType(x.element_type(), &p.dtype);
  if (err.failure()) return err;
  return Run(stream, p, w.untyped_data(), x.untyped_data(), out->untyped_data(), b.untyped_data(),
             pre->untyped_data(), workspace->untyped_data(), workspace->size_bytes());
}

// dy [M, K], w [N, K], pre [M, N] -> dpre [M, N] = (dy @ w^T) * gelu'(pre). DGELU, not DGELU_BGRAD: with the
// bias gradient cuBLASLt adds a separate epilogue kernel (0.32 ms per call at GPT-2 124M's shape on an H200,
// against 0.03 ms for XLA's reduction of dpre), so the caller reduces dpre itself.
ffi::Error GemmDgelu(cudaStream_t stream, ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::AnyBuffer pre,
                     ffi::Result<ffi::AnyBuffer> dpre, ffi::Result<ffi::AnyBuffer> workspace) {
  if (dy.dimensions().size() != 2 || w.dimensions().size() != 2 || Dim(dy, 1) != Dim(w, 1) ||
      pre.element_count() != static_cast<size_t>(Dim(dy, 0) * Dim(w, 0))) {
    return ffi::Error::InvalidArgument("jzero_gemm_dgelu: expected dy [M, K], w [N, K], pre [M, N]");
  }
  Problem p{CUBLASLT_EPILOGUE_DGELU, true, Dim(w, 0), Dim(dy, 0), Dim(dy, 1), CUDA_R_16BF};
  ffi::Error err = DataType(dy.element_type(), &p.dtype);
  if (err.failure()) return err;
  return Run(stream, p, w.untyped_data(), dy.untyped_data(), dpre->untyped_data(), nullptr, pre.untyped_data(),
             workspace->untyped_data(), workspace->size_bytes());
}

}  // namespace

// Loads the choices a file records ("<key> <index>" lines, "#" comments; a missing file is no choices). Returns
// how many.
extern "C" int JzeroLtLoad(const char* path) {
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return 0;
  std::lock_guard<std::mutex> lock(cache_mutex);
  char line[600];
  int n = 0;
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    size_t len = std::strlen(line);
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
    char* cut = std::strrchr(line, ' ');
    if (line[0] == '#' || cut == nullptr || cut == line) continue;
    *cut = '\0';
    recorded[line] = std::atoi(cut + 1);
    ++n;
  }
  std::fclose(f);
  return n;
}

// Where autotuned choices are appended ("" = nowhere), whether unrecorded problems are autotuned, and whether to
// print each problem's choice to stderr.
extern "C" void JzeroLtSetup(const char* path, int tune, int print) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  record_path = path == nullptr ? "" : path;
  autotune = tune != 0;
  verbose = print != 0;
}

// Each handler twice: plain, and marked compatible with XLA's command buffers (CUDA graphs), which lets XLA
// capture the call into the step's graph instead of splitting the graph around it (jzero's JZERO_LT_GRAPH=1).
// Only the plain ones may autotune: autotuning synchronises on events, which a graph capture forbids
// (jzero.kernels.gelu_gemm picks the symbol and refuses the combination).
#define JZ_DGELU_BINDING                                     \
  ffi::Ffi::Bind()                                          \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()             \
      .Arg<ffi::AnyBuffer>()   /* dy */                     \
      .Arg<ffi::AnyBuffer>()   /* w */                      \
      .Arg<ffi::AnyBuffer>()   /* pre */                    \
      .Ret<ffi::AnyBuffer>()   /* dpre */                   \
      .Ret<ffi::AnyBuffer>()   /* workspace */

#define JZ_BIAS_GELU_BINDING                                 \
  ffi::Ffi::Bind()                                          \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()             \
      .Arg<ffi::AnyBuffer>()   /* x */                      \
      .Arg<ffi::AnyBuffer>()   /* w */                      \
      .Arg<ffi::AnyBuffer>()   /* b */                      \
      .Ret<ffi::AnyBuffer>()   /* out */                    \
      .Ret<ffi::AnyBuffer>()   /* pre */                    \
      .Ret<ffi::AnyBuffer>()   /* workspace */

XLA_FFI_DEFINE_HANDLER_SYMBOL(JzeroGemmDgelu, GemmDgelu, JZ_DGELU_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JzeroGemmBiasGelu, GemmBiasGelu, JZ_BIAS_GELU_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JzeroGemmDgeluGraph, GemmDgelu, JZ_DGELU_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JzeroGemmBiasGeluGraph, GemmBiasGelu, JZ_BIAS_GELU_BINDING,
                              {ffi::Traits::kCmdBufferCompatible});
