// CudaModel: the V4 forward on the device, op for op the CPU ModelRunner
// (model.cc), built on the kernels of model/kernels/cuda. Comments cite
// V4_SPEC.md where the math is defined; the CPU code is the specification.
#include "model/v4/cuda_model.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "model/base/logging.h"
#include "model/base/status_macros.h"
#include "model/kernels/cuda/attention.cuh"
#include "model/kernels/cuda/compressor.cuh"
#include "model/kernels/cuda/cuda_runtime.cuh"
#include "model/kernels/cuda/dense_gemm.cuh"
#include "model/kernels/cuda/fp8_gemm.cuh"
#include "model/kernels/cuda/indexer.cuh"
#include "model/kernels/cuda/mhc.cuh"
#include "model/kernels/cuda/moe_router.cuh"
#include "model/kernels/cuda/mxfp4.cuh"
#include "model/kernels/cuda/norm_rope.cuh"
#include "model/kernels/cuda/random_fill.cuh"

namespace retort::v4 {

using cuda::DeviceBuffer;
using io::AttentionKind;

namespace {

// Rows from which FP8 projections go to cuBLASLt's block-scaled GEMM rather
// than the few-row kernel (which reads W once per 8 rows).
constexpr int64_t kFp8CublasMinRows = 16;
// Rows up to which bf16 projections use the few-row kernel (one pass over W).
constexpr int64_t kFewRowMaxRows = 8;

enum class WeightKind : uint8_t { kF32, kBf16, kMxFp4, kFp8 };

// y = x W^T on the device in one of four storage formats.
struct DeviceLinear {
  int64_t out = 0, in = 0;
  WeightKind kind = WeightKind::kF32;
  DeviceBuffer w;       // f32 / bf16 / e4m3 [out, in] or MXFP4 codes [out, in/2]
  DeviceBuffer scales;  // MXFP4: E8M0 [out, in/32]; FP8: f32 [ceil(out/128), ceil(in/128)]
  int64_t Bytes() const { return static_cast<int64_t>(w.bytes() + scales.bytes()); }
};

struct DeviceCompressor {
  int ratio = 0;
  int64_t dim = 0;
  bool overlap = false;
  DeviceLinear wkv, wgate;
  DeviceBuffer ape, norm;  // f32 [m, w], [c]
};

struct DeviceHc {
  DeviceBuffer fn, base, scale;  // f32
  int64_t Bytes() const { return static_cast<int64_t>(fn.bytes() + base.bytes() + scale.bytes()); }
};

// Routed experts stacked [E, out, in] (MXFP4 codes/scales, or f32 for HF
// checkpoints whose experts are dense).
struct ExpertStack {
  bool mxfp4 = true;
  DeviceBuffer w1, w3, w2;     // gate [E, I, d], up [E, I, d], down [E, d, I]
  DeviceBuffer s1, s3, s2;     // E8M0 scales (MXFP4)
  int64_t BytesPerExpert(int E) const {
    return static_cast<int64_t>(w1.bytes() + w3.bytes() + w2.bytes() + s1.bytes() + s3.bytes() + s2.bytes()) / E;
  }
};

struct DeviceLayer {
  AttentionKind kind = AttentionKind::kSliding;
  DeviceHc attn_hc, ffn_hc;
  DeviceBuffer attn_norm, ffn_norm;
  DeviceLinear wq_a, wq_b, wkv, wo_b;
  DeviceLinear wo_a;  // [G * dg, per]: group g's rows g*dg.. read its heads' `per` inputs
  DeviceBuffer q_norm, kv_norm, sinks;
  DeviceCompressor comp;
  DeviceLinear idx_wq_b, idx_wproj;
  DeviceCompressor idx_comp;
  DeviceBuffer gate, bias, tid2eid;  // f32 [E, d], f32 [E], i64 [vocab, k]
  bool hash_routed = false;
  ExpertStack experts;
  bool has_shared = false;
  DeviceLinear sh_w1, sh_w3, sh_w2;
};

// One compressor's state pools over all slots (V4_SPEC.md §3).
struct CompressorPool {
  DeviceBuffer pending_kv, pending_score, prev_kv, prev_score, entries;
  int64_t cap = 0;
  cuda::CompressorStateView View() const {
    return {pending_kv.as<float>(), pending_score.as<float>(), prev_kv.as<float>(), prev_score.as<float>(),
            entries.as<float>()};
  }
  int64_t Bytes() const {
    return static_cast<int64_t>(pending_kv.bytes() + pending_score.bytes() + prev_kv.bytes() + prev_score.bytes() +
                                entries.bytes());
  }
};

struct LayerPool {
  DeviceBuffer ring;  // [slots, win, D]
  CompressorPool kv, index;
};

absl::StatusOr<DeviceBuffer> UploadBytes(const void* src, size_t bytes) {
  ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(bytes));
  if (bytes) RETURN_IF_ERROR(cuda::CopyToDevice(b.get(), src, bytes));
  return b;
}
absl::StatusOr<DeviceBuffer> UploadTensor(const Tensor& t) {
  if (!t.defined()) return DeviceBuffer();
  return UploadBytes(t.raw(), t.nbytes());
}
absl::StatusOr<DeviceBuffer> ZerosBuffer(size_t bytes) {
  ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(bytes));
  if (bytes) RETORT_CUDA_RETURN(cudaMemset(b.get(), 0, bytes));
  return b;
}

// f32 on the device -> a bf16 copy.
absl::StatusOr<DeviceBuffer> ToBf16(const DeviceBuffer& f32, int64_t n) {
  ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(sizeof(uint16_t) * n));
  RETURN_IF_ERROR(cuda::F32ToBf16(f32.as<float>(), n, b.as<uint16_t>(), nullptr));
  RETORT_CUDA_RETURN(cudaDeviceSynchronize());
  return b;
}

// f32 [out, in] on the device -> FP8 e4m3 codes + f32 128 x 128 block scales.
absl::Status QuantizeToFp8(const DeviceBuffer& f32, DeviceLinear& d) {
  d.kind = WeightKind::kFp8;
  ASSIGN_OR_RETURN(d.w, DeviceBuffer::Allocate(d.out * d.in));
  ASSIGN_OR_RETURN(d.scales, DeviceBuffer::Allocate(sizeof(float) * ((d.out + 127) / 128) * ((d.in + 127) / 128)));
  RETURN_IF_ERROR(cuda::Fp8QuantizeWeights(f32.as<float>(), d.out, d.in, d.w.as<uint8_t>(), d.scales.as<float>(),
                                           nullptr));
  RETORT_CUDA_RETURN(cudaDeviceSynchronize());
  return absl::OkStatus();
}

// Deployment numerics keep a checkpoint's FP8 matrices FP8: their f32 values
// are e4m3 x 2^k on the 128 x 128 grid, and re-quantizing them on that grid
// gives the checkpoint's values back exactly. The few-row kernel needs in %
// 16 == 0; other widths stay bf16.
bool KeepFp8(const Linear& l, bool deployment) { return deployment && l.fp8 && l.in % 16 == 0; }

absl::StatusOr<DeviceLinear> UploadLinear(const Linear& l, bool bf16) {
  DeviceLinear d;
  d.out = l.out, d.in = l.in;
  if (l.mxfp4) {
    d.kind = WeightKind::kMxFp4;
    ASSIGN_OR_RETURN(d.w, UploadTensor(l.weight));
    ASSIGN_OR_RETURN(d.scales, UploadTensor(l.scales));
    return d;
  }
  ASSIGN_OR_RETURN(DeviceBuffer f, UploadTensor(l.weight));
  if (KeepFp8(l, bf16)) {
    RETURN_IF_ERROR(QuantizeToFp8(f, d));
    return d;
  }
  if (!bf16) {
    d.kind = WeightKind::kF32;
    d.w = std::move(f);
    return d;
  }
  d.kind = WeightKind::kBf16;
  ASSIGN_OR_RETURN(d.w, ToBf16(f, l.out * l.in));
  return d;
}

// A random linear: uniform(-a, a), a = sqrt(3 / in) (unit output variance for
// unit inputs); MXFP4: random codes with one E8M0 scale per block chosen for
// the same variance (E[e2m1^2] = 8.5625 over the 16 codes).
absl::StatusOr<DeviceLinear> RandomLinear(int64_t out, int64_t in, WeightKind kind, uint64_t seed) {
  DeviceLinear d;
  d.out = out, d.in = in, d.kind = kind;
  const int64_t n = out * in;
  const float a = std::sqrt(3.0f / static_cast<float>(in));
  switch (kind) {
    case WeightKind::kF32: {
      ASSIGN_OR_RETURN(d.w, DeviceBuffer::Allocate(sizeof(float) * n));
      RETURN_IF_ERROR(cuda::FillUniform(d.w.as<float>(), n, seed, -a, a, nullptr));
      break;
    }
    case WeightKind::kBf16: {
      ASSIGN_OR_RETURN(d.w, DeviceBuffer::Allocate(sizeof(uint16_t) * n));
      RETURN_IF_ERROR(cuda::FillUniformBf16(d.w.as<uint16_t>(), n, seed, -a, a, nullptr));
      break;
    }
    case WeightKind::kFp8: {  // uniform values on the FP8 grid
      ASSIGN_OR_RETURN(DeviceBuffer f, DeviceBuffer::Allocate(sizeof(float) * n));
      RETURN_IF_ERROR(cuda::FillUniform(f.as<float>(), n, seed, -a, a, nullptr));
      RETURN_IF_ERROR(QuantizeToFp8(f, d));
      break;
    }
    case WeightKind::kMxFp4: {
      ASSIGN_OR_RETURN(d.w, DeviceBuffer::Allocate(n / 2));
      ASSIGN_OR_RETURN(d.scales, DeviceBuffer::Allocate(n / 32));
      RETURN_IF_ERROR(cuda::FillBytes(d.w.as<uint8_t>(), n / 2, seed, 0, 255, nullptr));
      const int e = static_cast<int>(std::lround(127.0 - 0.5 * std::log2(8.5625 * static_cast<double>(in))));
      RETURN_IF_ERROR(cuda::FillBytes(d.scales.as<uint8_t>(), n / 32, seed + 1, static_cast<uint8_t>(e),
                                      static_cast<uint8_t>(e), nullptr));
      break;
    }
  }
  return d;
}

absl::StatusOr<DeviceBuffer> RandomF32(int64_t n, uint64_t seed, float lo, float hi) {
  ASSIGN_OR_RETURN(DeviceBuffer b, DeviceBuffer::Allocate(sizeof(float) * n));
  RETURN_IF_ERROR(cuda::FillUniform(b.as<float>(), n, seed, lo, hi, nullptr));
  return b;
}
absl::StatusOr<DeviceBuffer> ConstF32(int64_t n, float v) {
  std::vector<float> h(n, v);
  return UploadBytes(h.data(), sizeof(float) * n);
}

}  // namespace

// The per-step plan: host-side metadata of the rows and chunks, packed into
// one pinned buffer and copied to the device in one transfer.
struct StepPlan {
  int64_t N = 0;
  int S = 0;
  int64_t max_T = 0;
  int64_t max_position = 0;  // launch-shape bound (graph: max_length)
  std::vector<int32_t> row_seq, seq_slot, seq_row0, seq_T, row_slot;
  std::vector<int64_t> positions, tokens, seq_p0;
  std::map<int, std::vector<int32_t>> visible;  // ratio -> (p + 1) / m per row
  std::map<int, int64_t> visible_bound;         // ratio -> bound on visible (launch shapes)
};

struct CudaModel::Impl {
  io::V4Config config;
  CudaModelOptions options;
  std::vector<float> inv_freq_host[2];
  DeviceBuffer inv_freq[2];
  DeviceBuffer embed;  // f32 [V, d]
  std::vector<DeviceLayer> layers;
  DeviceHc hc_head;
  DeviceBuffer norm;
  DeviceLinear head;
  bool dense_bf16 = false;

  std::vector<LayerPool> pools;
  std::vector<int64_t> lengths;  // per slot; -1: free
  bool broken = false;

  cuda::Stream stream;
  cuda::Blas blas;
  DeviceBuffer blas_workspace;
  // FP8 block GEMM plans by (padded rows, in, out), sharing one workspace;
  // an empty entry: cuBLASLt has no algorithm for the shape.
  std::map<std::tuple<int64_t, int64_t, int64_t>, std::optional<cuda::Fp8BlockGemm>> fp8_plans;
  DeviceBuffer fp8_workspace;
  cuda::CachingAllocator alloc;
  std::vector<void*> step_allocs;
  // Logits [rows, V] and step metadata (pinned staging + device copy); the
  // decode graph has its own, since eager steps may reallocate these.
  struct StepBuffers {
    DeviceBuffer logits;
    cuda::PinnedHostBuffer meta_host;
    DeviceBuffer meta_dev;
  };
  StepBuffers eager_bufs, graph_bufs;

  // Metadata device pointers of the current step.
  const int32_t *d_row_seq = nullptr, *d_seq_slot = nullptr, *d_seq_row0 = nullptr, *d_seq_T = nullptr,
                *d_row_slot = nullptr;
  const int64_t *d_positions = nullptr, *d_tokens = nullptr, *d_seq_p0 = nullptr;
  std::map<int, const int32_t*> d_visible;

  // Profiling.
  bool profiling = false;
  std::vector<cuda::Event> events;
  std::vector<std::string> event_names;
  size_t events_used = 0;
  CudaProfile profile;

  // Decode graph.
  std::vector<int> graph_seqs;
  cudaGraphExec_t graph_exec = nullptr;
  int graph_calls = 0;
  bool capturing = false;

  ~Impl() {
    if (graph_exec) cudaGraphExecDestroy(graph_exec);
    for (cudaEvent_t e : fork_events) cudaEventDestroy(e);
    FreeStepAllocs();
  }

  // Side streams for the independent chains of a decode step (Branching),
  // and the events that fork them from and join them to the main stream.
  cuda::Stream side[2];
  cuda::Blas side_blas[2];
  DeviceBuffer side_blas_workspace[2];
  std::vector<cudaEvent_t> fork_events;
  size_t fork_used = 0;
  cudaStream_t current = nullptr;  // where ops are enqueued; nullptr: the main stream

  cudaStream_t st() const { return current ? current : stream.get(); }
  // The cuBLAS handle of the current stream (each with its own workspace of
  // the same size, so algorithm choices do not depend on the stream).
  const cuda::Blas& Blas() const {
    for (int i = 0; i < 2; ++i)
      if (current && current == side[i].get()) return side_blas[i];
    return blas;
  }

  // Enqueues on `s` while in scope.
  struct OnStream {
    Impl* m;
    cudaStream_t prev;
    OnStream(Impl* impl, cudaStream_t s) : m(impl), prev(impl->current) { m->current = s; }
    ~OnStream() { m->current = prev; }
  };
  // Branch on decode-sized steps (prefill ops fill the GPU by themselves);
  // profiling keeps one stream so per-op times stay separable.
  bool Branching(const StepPlan& p) const { return p.N <= kFewRowMaxRows && !profiling; }
  absl::StatusOr<cudaEvent_t> RecordOn(cudaStream_t s) {
    if (fork_used == fork_events.size()) {
      cudaEvent_t e = nullptr;
      RETORT_CUDA_RETURN(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      fork_events.push_back(e);
    }
    cudaEvent_t e = fork_events[fork_used++];
    RETORT_CUDA_RETURN(cudaEventRecord(e, s));
    return e;
  }
  absl::Status Fork(int i) {  // side stream i waits for the main stream's work so far
    ASSIGN_OR_RETURN(cudaEvent_t e, RecordOn(stream.get()));
    RETORT_CUDA_RETURN(cudaStreamWaitEvent(side[i].get(), e, 0));
    return absl::OkStatus();
  }
  absl::Status Join(int i) {  // the main stream waits for side stream i's work so far
    ASSIGN_OR_RETURN(cudaEvent_t e, RecordOn(side[i].get()));
    RETORT_CUDA_RETURN(cudaStreamWaitEvent(stream.get(), e, 0));
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T*> Scratch(int64_t n) {
    ASSIGN_OR_RETURN(void* p, alloc.Allocate(sizeof(T) * std::max<int64_t>(n, 1)));
    step_allocs.push_back(p);
    return static_cast<T*>(p);
  }
  void FreeStepAllocs() {
    for (void* p : step_allocs) alloc.Free(p);
    step_allocs.clear();
  }

  absl::Status Mark(const char* name) {
    if (!profiling || capturing) return absl::OkStatus();
    if (events_used == events.size()) {
      ASSIGN_OR_RETURN(cuda::Event e, cuda::Event::Create());
      events.push_back(std::move(e));
      event_names.emplace_back();
    }
    event_names[events_used] = name;
    return events[events_used++].Record(st());
  }
  absl::Status CollectProfile() {
    if (!profiling || events_used < 2) {
      events_used = 0;
      return absl::OkStatus();
    }
    RETURN_IF_ERROR(events[events_used - 1].Synchronize());
    for (size_t i = 0; i + 1 < events_used; ++i) {
      ASSIGN_OR_RETURN(float ms, events[i + 1].ElapsedMsSince(events[i]));
      auto it = std::find_if(profile.ms.begin(), profile.ms.end(),
                             [&](const auto& p) { return p.first == event_names[i]; });
      if (it == profile.ms.end()) profile.ms.emplace_back(event_names[i], ms);
      else it->second += ms;
    }
    ++profile.steps;
    events_used = 0;
    return absl::OkStatus();
  }

  // xq: optionally, x already FP8-quantized (RmsNormQuant) for an FP8 l on
  // the few-row path.
  absl::Status Apply(const DeviceLinear& l, const float* x, int64_t T, float* y, const uint16_t* xq = nullptr) {
    switch (l.kind) {
      case WeightKind::kF32:
        return cuda::MatMulF32(Blas(), x, T, l.in, l.w.as<float>(), l.out, y, st());
      case WeightKind::kBf16: {
        // Decode-sized steps: one launch that rounds x to bf16 on load (no
        // conversion kernel, no split-K reduction); cuBLAS otherwise.
        if (T <= kFewRowMaxRows && l.in % 16 == 0)
          return cuda::Bf16MatMulRows(x, T, l.in, l.w.as<uint16_t>(), l.out, l.in, y, st());
        ASSIGN_OR_RETURN(uint16_t* xb, Scratch<uint16_t>(T * l.in));
        RETURN_IF_ERROR(cuda::F32ToBf16(x, T * l.in, xb, st()));
        return cuda::MatMulBf16(Blas(), xb, T, l.in, l.w.as<uint16_t>(), l.out, y, st());
      }
      case WeightKind::kMxFp4: {
        if (dense_bf16 && options.tensor_core_experts && T >= cuda::kMxFp4TensorCoreMinRows && l.in % 128 == 0) {
          ASSIGN_OR_RETURN(uint16_t* xb, Scratch<uint16_t>(T * l.in));
          RETURN_IF_ERROR(cuda::F32ToBf16(x, T * l.in, xb, st()));
          return cuda::MxFp4MatMulTensorCore(xb, T, l.in, l.w.as<uint8_t>(), l.scales.as<uint8_t>(), l.out, y, st());
        }
        return cuda::MxFp4MatMul(x, T, l.in, l.w.as<uint8_t>(), l.scales.as<uint8_t>(), l.out, y, st());
      }
      case WeightKind::kFp8:
        return ApplyFp8(l.w.as<uint8_t>(), l.scales.as<float>(), l.out, l.in, 1, x, T, l.in, y, xq);
    }
    return absl::InternalError("unreachable");
  }

  // y [T, out] = x W^T for FP8 W [out, K] in `groups` groups of out/groups
  // rows, group g reading columns [g K, (g+1) K) of x [T, ldx] (f32); y rows
  // are contiguous [T, out]. Few rows, or shapes cuBLASLt's block-scaled
  // kernels do not take: the few-row kernel on quant-dequantized x; else
  // cuBLASLt per group on FP8 x. Both quantize x per 1 x 128 block of a group.
  absl::Status ApplyFp8(const uint8_t* w, const float* w_scales, int64_t out, int64_t K, int groups, const float* x,
                        int64_t T, int64_t ldx, float* y, const uint16_t* xq_given = nullptr) {
    const int64_t per = out / groups;
    if (!options.fp8_activations) {  // W8A16: bf16 activations on the few-row kernel
      ASSIGN_OR_RETURN(uint16_t* xb, Scratch<uint16_t>(T * ldx));
      RETURN_IF_ERROR(cuda::F32ToBf16(x, T * ldx, xb, st()));
      return cuda::Fp8MatMulRows(xb, T, ldx, w, w_scales, out, K, per, y, st());
    }
    const bool lt = T >= kFp8CublasMinRows && K % 512 == 0 && per % 16 == 0 && per % 128 == 0;
    const cuda::Fp8BlockGemm* plan = nullptr;
    if (lt) {
      ASSIGN_OR_RETURN(plan, Fp8Plan(T, K, per));
    }
    if (plan == nullptr) {
      if (xq_given) return cuda::Fp8MatMulRows(xq_given, T, ldx, w, w_scales, out, K, per, y, st());
      ASSIGN_OR_RETURN(uint16_t* xq, Scratch<uint16_t>(T * ldx));
      RETURN_IF_ERROR(cuda::Fp8QuantDequant(x, T, ldx, K, xq, st()));
      return cuda::Fp8MatMulRows(xq, T, ldx, w, w_scales, out, K, per, y, st());
    }
    const int64_t Tp = cuda::Fp8ActScaleStride(T);
    ASSIGN_OR_RETURN(uint8_t* xq, Scratch<uint8_t>(Tp * K));
    ASSIGN_OR_RETURN(float* xs, Scratch<float>(Tp * (K / 128)));
    const bool direct = groups == 1 && Tp == T;
    float* yg = y;
    if (!direct) {
      ASSIGN_OR_RETURN(yg, Scratch<float>(Tp * per));
    }
    float* xg = nullptr;
    if (groups > 1) {
      ASSIGN_OR_RETURN(xg, Scratch<float>(T * K));
    }
    const int64_t kb = (K + 127) / 128;
    for (int g = 0; g < groups; ++g) {
      const float* xin = x;
      if (groups > 1) {  // group g's columns, contiguous
        RETORT_CUDA_RETURN(cudaMemcpy2DAsync(xg, sizeof(float) * K, x + g * K, sizeof(float) * ldx, sizeof(float) * K,
                                             T, cudaMemcpyDeviceToDevice, st()));
        xin = xg;
      }
      RETURN_IF_ERROR(cuda::Fp8QuantizeActivations(xin, T, K, cuda::Fp8ScaleRule::kPow2, xq, xs, st()));
      RETURN_IF_ERROR(plan->Run(xq, xs, w + g * per * K, w_scales + g * (per / 128) * kb, yg, st()));
      if (!direct)
        RETORT_CUDA_RETURN(cudaMemcpy2DAsync(y + g * per, sizeof(float) * out, yg, sizeof(float) * per,
                                             sizeof(float) * per, T, cudaMemcpyDeviceToDevice, st()));
    }
    return absl::OkStatus();
  }

  // The cuBLASLt plan for (T, in, out), made once (outside graph capture: a
  // capture replays shapes its eager first call planned); nullptr when this
  // cuBLASLt has no algorithm for it (the few-row kernel serves instead).
  absl::StatusOr<const cuda::Fp8BlockGemm*> Fp8Plan(int64_t T, int64_t in, int64_t out) {
    const auto key = std::make_tuple(cuda::Fp8ActScaleStride(T), in, out);
    auto it = fp8_plans.find(key);
    if (it != fp8_plans.end()) return it->second ? &*it->second : nullptr;
    if (capturing) return absl::InternalError("FP8 GEMM plan first needed during graph capture");
    if (!fp8_workspace.get()) {
      ASSIGN_OR_RETURN(fp8_workspace, DeviceBuffer::Allocate(cuda::kFp8GemmWorkspaceBytes));
    }
    absl::StatusOr<cuda::Fp8BlockGemm> plan =
        cuda::Fp8BlockGemm::Create(std::get<0>(key), in, out, cuda::Fp8GemmOutput::kF32, fp8_workspace.get());
    if (!plan.ok() && plan.status().code() != absl::StatusCode::kUnimplemented) return plan.status();
    auto& slot = fp8_plans[key];
    if (plan.ok()) slot = std::move(*plan);
    return slot ? &*slot : nullptr;
  }

  // Steps whose FP8 projections run on the few-row kernel get their inputs
  // quantized by the RmsNorm that produces them (one launch, not one per
  // projection).
  bool QuantizeOnNorm(int64_t N) const { return dense_bf16 && options.fp8_activations && N < kFp8CublasMinRows; }
  // y = RmsNorm(x); returns y's FP8 quantization too when QuantizeOnNorm and
  // y feeds an FP8 projection (`fp8_consumer`), else nullptr.
  absl::StatusOr<const uint16_t*> Norm(const float* x, int64_t N, int64_t D, const DeviceBuffer& w, float* y,
                                       bool fp8_consumer) {
    if (!fp8_consumer || !QuantizeOnNorm(N)) {
      RETURN_IF_ERROR(cuda::RmsNorm(x, N, D, w.as<float>(), Eps(), y, st()));
      return nullptr;
    }
    ASSIGN_OR_RETURN(uint16_t* yq, Scratch<uint16_t>(N * D));
    RETURN_IF_ERROR(cuda::RmsNormQuant(x, N, D, w.as<float>(), Eps(), y, yq, st()));
    return yq;
  }

  cuda::HcParams Hc() const {
    cuda::HcParams p;
    p.hc = config.hc_mult;
    p.d = config.hidden_size;
    p.sinkhorn_iters = config.hc_sinkhorn_iters;
    p.rms_eps = static_cast<float>(config.rms_norm_eps);
    p.hc_eps = static_cast<float>(config.hc_eps);
    return p;
  }
  float Eps() const { return static_cast<float>(config.rms_norm_eps); }
  int64_t RopeDim() const { return static_cast<int64_t>(inv_freq_host[0].size() * 2); }

  absl::Status Compress(const DeviceCompressor& k, CompressorPool& pool, const float* x, const StepPlan& plan) {
    const int64_t N = plan.N, w = k.wkv.out;
    ASSIGN_OR_RETURN(float* kv, Scratch<float>(N * w));
    ASSIGN_OR_RETURN(float* score, Scratch<float>(N * w));
    RETURN_IF_ERROR(Apply(k.wkv, x, N, kv));
    RETURN_IF_ERROR(Apply(k.wgate, x, N, score));
    cuda::CompressorShape s;
    s.m = k.ratio;
    s.c = k.dim;
    s.overlap = k.overlap;
    s.rope_dim = RopeDim();
    s.cap = pool.cap;
    s.rms_eps = Eps();
    cuda::CompressorChunks ch;
    ch.S = plan.S;
    ch.seq_slot = d_seq_slot, ch.seq_p0 = d_seq_p0, ch.seq_row0 = d_seq_row0, ch.seq_T = d_seq_T;
    ch.max_T = plan.max_T;
    ch.max_emit = plan.max_T / k.ratio + 1;
    return cuda::CompressorStep(s, ch, kv, score, k.ape.as<float>(), k.norm.as<float>(), inv_freq[1].as<float>(),
                                pool.View(), st());
  }

  // x: the normed layer input; xq: its FP8 quantization or nullptr (Norm).
  absl::Status Attention(int l, const float* x, const uint16_t* xq, const StepPlan& plan, float* out) {
    const DeviceLayer& L = layers[l];
    LayerPool& P = pools[l];
    const auto& c = config;
    const int64_t N = plan.N, D = c.head_dim, H = c.num_heads, dc = c.q_lora_rank;
    const int kind = L.kind == AttentionKind::kSliding ? 0 : 1;
    const int64_t rd = RopeDim();
    ASSIGN_OR_RETURN(float* qr, Scratch<float>(N * dc));
    ASSIGN_OR_RETURN(float* q, Scratch<float>(N * H * D));
    ASSIGN_OR_RETURN(float* kv, Scratch<float>(N * D));
    const bool compressed = L.kind != AttentionKind::kSliding, csa = L.kind == AttentionKind::kCsa;
    const int Hi = c.index_n_heads;
    const int64_t Di = c.index_head_dim, k = c.index_topk;
    float* iq = nullptr;
    float* iw = nullptr;
    if (csa) {
      ASSIGN_OR_RETURN(iq, Scratch<float>(N * Hi * Di));
      ASSIGN_OR_RETURN(iw, Scratch<float>(N * Hi));
    }
    // The independent chains of the layer's input x.
    const uint16_t* qrq = nullptr;  // qr's FP8 quantization (QuantizeOnNorm)
    auto q_path = [&]() -> absl::Status {
      RETURN_IF_ERROR(Apply(L.wq_a, x, N, qr, xq));
      ASSIGN_OR_RETURN(qrq, Norm(qr, N, dc, L.q_norm, qr, L.wq_b.kind == WeightKind::kFp8));
      RETURN_IF_ERROR(Apply(L.wq_b, qr, N, q, qrq));
      return cuda::RmsNormRope(q, N, H, D, nullptr, Eps(), rd, d_positions, inv_freq[kind].as<float>(), q, st());
    };
    auto kv_path = [&]() -> absl::Status {
      RETURN_IF_ERROR(Apply(L.wkv, x, N, kv, xq));
      return cuda::RmsNormRope(kv, N, 1, D, L.kv_norm.as<float>(), Eps(), rd, d_positions,
                               inv_freq[kind].as<float>(), kv, st());
    };
    auto index_query = [&]() -> absl::Status {  // after q_path (reads qr)
      RETURN_IF_ERROR(Apply(L.idx_wq_b, qr, N, iq, qrq));
      return cuda::RopeAtPositions(iq, N, Hi, Di, rd, d_positions, inv_freq[1].as<float>(), 1.0f, st());
    };
    if (Branching(plan)) {
      // Decode steps: side stream 0 runs the KV projection and the main
      // compressor, side stream 1 the indexer's compressor and head weights,
      // beside the query chain; all join before the indexer scores.
      RETURN_IF_ERROR(Fork(0));
      if (csa) RETURN_IF_ERROR(Fork(1));
      {
        OnStream on(this, side[0].get());
        RETURN_IF_ERROR(kv_path());
        if (compressed) RETURN_IF_ERROR(Compress(L.comp, P.kv, x, plan));
      }
      if (csa) {
        OnStream on(this, side[1].get());
        RETURN_IF_ERROR(Compress(L.idx_comp, P.index, x, plan));
        RETURN_IF_ERROR(Apply(L.idx_wproj, x, N, iw));
      }
      RETURN_IF_ERROR(q_path());
      if (csa) RETURN_IF_ERROR(index_query());
      RETURN_IF_ERROR(Join(0));
      if (csa) RETURN_IF_ERROR(Join(1));
    } else {
      RETURN_IF_ERROR(Mark("attn.q/kv proj"));
      RETURN_IF_ERROR(q_path());
      RETURN_IF_ERROR(kv_path());
      if (compressed) {
        RETURN_IF_ERROR(Mark("attn.compressor"));
        RETURN_IF_ERROR(Compress(L.comp, P.kv, x, plan));
      }
      if (csa) {
        RETURN_IF_ERROR(Compress(L.idx_comp, P.index, x, plan));
        RETURN_IF_ERROR(Mark("attn.indexer"));
        RETURN_IF_ERROR(index_query());
        RETURN_IF_ERROR(Apply(L.idx_wproj, x, N, iw));
      }
    }

    const int32_t* count = compressed ? d_visible.at(L.comp.ratio) : nullptr;
    const int32_t* selected = nullptr;
    int64_t sel_stride = 0;
    if (csa) {
      ASSIGN_OR_RETURN(int32_t* sel, Scratch<int32_t>(N * k));
      ASSIGN_OR_RETURN(int32_t* cnt, Scratch<int32_t>(N));
      const int64_t bound = std::max<int64_t>(plan.visible_bound.at(L.comp.ratio), 1);
      // Scores in row blocks of at most 256 MiB.
      const int64_t block = std::max<int64_t>(1, std::min<int64_t>({N, (int64_t{64} << 20) / bound, 65535}));
      ASSIGN_OR_RETURN(float* scores, Scratch<float>(block * bound));
      const int32_t* vis = d_visible.at(L.comp.ratio);
      for (int64_t r0 = 0; r0 < N; r0 += block) {
        const int64_t nb = std::min(block, N - r0);
        RETURN_IF_ERROR(cuda::IndexerScoresForRows(iq + r0 * Hi * Di, iw + r0 * Hi, P.index.entries.as<float>(),
                                                   P.index.cap, d_row_slot + r0, vis + r0, nb, Hi,
                                                   static_cast<int>(Di), scores, bound, st()));
        RETURN_IF_ERROR(cuda::TopKAscending(scores, vis + r0, nb, bound, static_cast<int>(k), sel + r0 * k,
                                            cnt + r0, st()));
      }
      selected = sel, count = cnt, sel_stride = k;
    }
    RETURN_IF_ERROR(Mark("attn.core"));
    ASSIGN_OR_RETURN(float* o, Scratch<float>(N * H * D));
    cuda::StepAttentionArgs a;
    a.N = N, a.H = H, a.D = D;
    a.q = q, a.kv = kv, a.ring = P.ring.as<float>(), a.win = c.sliding_window;
    a.row_seq = d_row_seq, a.positions = d_positions;
    a.seq_slot = d_seq_slot, a.seq_p0 = d_seq_p0, a.seq_row0 = d_seq_row0;
    a.entries = compressed ? P.kv.entries.as<float>() : nullptr;
    a.cap = P.kv.cap;
    a.selected = selected, a.sel_stride = sel_stride, a.count = count;
    a.sinks = L.sinks.as<float>();
    a.out = o;
    a.max_keys = std::min<int64_t>(plan.max_position + 1, c.sliding_window);
    if (L.kind == AttentionKind::kHca) a.max_keys += plan.visible_bound.at(L.comp.ratio);
    if (csa) a.max_keys += c.index_topk;
    if (const int64_t n = cuda::StepAttentionScratchFloats(N, H, D, a.max_keys); n > 0) {
      ASSIGN_OR_RETURN(a.partial, Scratch<float>(n));
    }
    RETURN_IF_ERROR(cuda::StepAttention(a, st()));
    RETURN_IF_ERROR(cuda::WriteWindowRing(kv, D, P.ring.as<float>(), c.sliding_window, plan.S, d_seq_slot, d_seq_p0,
                                          d_seq_row0, d_seq_T, st()));
    RETURN_IF_ERROR(cuda::RopeAtPositions(o, N, H, D, rd, d_positions, inv_freq[kind].as<float>(), -1.0f, st()));
    // Grouped output projection (§2.2): group g's heads -> d_g, then wo_b.
    RETURN_IF_ERROR(Mark("attn.out proj"));
    const int G = c.o_groups;
    const int64_t per = H * D / G, dg = c.o_lora_rank;
    ASSIGN_OR_RETURN(float* mid, Scratch<float>(N * G * dg));
    if (L.wo_a.kind == WeightKind::kFp8) {
      RETURN_IF_ERROR(ApplyFp8(L.wo_a.w.as<uint8_t>(), L.wo_a.scales.as<float>(), G * dg, per, G, o, N, H * D, mid));
    } else if (L.wo_a.kind == WeightKind::kBf16) {
      ASSIGN_OR_RETURN(uint16_t* ob, Scratch<uint16_t>(N * H * D));
      RETURN_IF_ERROR(cuda::F32ToBf16(o, N * H * D, ob, st()));
      RETURN_IF_ERROR(cuda::GroupedProjectionBf16(Blas(), ob, N, H * D, G, per, L.wo_a.w.as<uint16_t>(), dg, mid, st()));
    } else {
      RETURN_IF_ERROR(cuda::GroupedProjectionF32(Blas(), o, N, H * D, G, per, L.wo_a.w.as<float>(), dg, mid, st()));
    }
    return Apply(L.wo_b, mid, N, out);
  }

  absl::Status Moe(int l, const float* x, const uint16_t* xq, const StepPlan& plan, float* out) {
    const DeviceLayer& L = layers[l];
    const auto& c = config;
    const int64_t N = plan.N, d = c.hidden_size, I = c.moe_intermediate;
    const int E = c.n_routed_experts, K = c.experts_per_token;
    const int64_t NK = N * K;
    const float limit = static_cast<float>(c.swiglu_limit);
    float* shared = nullptr;
    auto shared_expert = [&]() -> absl::Status {
      const int64_t Is = L.sh_w1.out;
      ASSIGN_OR_RETURN(float* sg, Scratch<float>(N * Is));
      ASSIGN_OR_RETURN(float* su, Scratch<float>(N * Is));
      RETURN_IF_ERROR(Apply(L.sh_w1, x, N, sg, xq));
      RETURN_IF_ERROR(Apply(L.sh_w3, x, N, su, xq));
      RETURN_IF_ERROR(cuda::SwiGlu(sg, su, N * Is, limit, sg, st()));
      return Apply(L.sh_w2, sg, N, shared);
    };
    if (L.has_shared) {
      ASSIGN_OR_RETURN(shared, Scratch<float>(N * d));
    }
    // Decode steps: the shared expert runs on side stream 0 beside the router
    // and the routed experts.
    const bool shared_branch = L.has_shared && Branching(plan);
    if (shared_branch) {
      RETURN_IF_ERROR(Fork(0));
      OnStream on(this, side[0].get());
      RETURN_IF_ERROR(shared_expert());
    }
    RETURN_IF_ERROR(Mark("moe.router"));
    ASSIGN_OR_RETURN(float* logits, Scratch<float>(N * E));
    RETURN_IF_ERROR(cuda::MatMulF32(Blas(), x, N, d, L.gate.as<float>(), E, logits, st()));
    ASSIGN_OR_RETURN(int32_t* idx, Scratch<int32_t>(NK));
    ASSIGN_OR_RETURN(float* wts, Scratch<float>(NK));
    RETURN_IF_ERROR(cuda::MoeRoute(logits, N, E, K, L.hash_routed ? nullptr : L.bias.as<float>(),
                                   L.hash_routed ? L.tid2eid.as<int64_t>() : nullptr, d_tokens,
                                   static_cast<float>(c.routed_scaling_factor), idx, wts, st()));
    const int groups = static_cast<int>(std::min<int64_t>(E, NK));
    ASSIGN_OR_RETURN(int32_t* scratch, Scratch<int32_t>(2 * E));
    ASSIGN_OR_RETURN(int32_t* row_index, Scratch<int32_t>(NK));
    ASSIGN_OR_RETURN(int32_t* slot_pos, Scratch<int32_t>(NK));
    ASSIGN_OR_RETURN(int32_t* goff, Scratch<int32_t>(groups + 1));
    ASSIGN_OR_RETURN(int32_t* gexp, Scratch<int32_t>(groups));
    RETURN_IF_ERROR(cuda::MoePermute(idx, N, K, E, groups, scratch, row_index, slot_pos, goff, gexp, st()));
    RETURN_IF_ERROR(Mark("moe.experts"));
    ASSIGN_OR_RETURN(float* g, Scratch<float>(NK * I));
    ASSIGN_OR_RETURN(float* u, Scratch<float>(NK * I));
    ASSIGN_OR_RETURN(float* y, Scratch<float>(NK * d));
    const ExpertStack& X = L.experts;
    // Deployment numerics with several rows per expert on average: the
    // tensor-core kernels on bf16 activations; otherwise the CUDA-core kernels
    // on f32 activations. Grouped over a 256-expert stack the tensor cores win
    // from ~4 rows per expert (bench/mxfp4_gemm: 256 tokens x 6 routed take
    // 2.5 ms on CUDA cores, 512 tokens 1.35 ms on tensor cores: the grouped
    // tensor-core kernel reads each expert once whatever its rows), below the
    // 16 rows mxfp4.cuh measured for one expert matrix alone.
    constexpr int64_t kTensorCoreRowsPerExpert = 4;
    const bool tensor_cores = X.mxfp4 && dense_bf16 && options.tensor_core_experts && d % 128 == 0 && I % 128 == 0 &&
                              NK >= kTensorCoreRowsPerExpert * groups;
    if (tensor_cores) {
      ASSIGN_OR_RETURN(uint16_t* xb, Scratch<uint16_t>(N * d));
      RETURN_IF_ERROR(cuda::F32ToBf16(x, N * d, xb, st()));
      RETURN_IF_ERROR(cuda::MxFp4GroupedMatMulTensorCore(xb, d, X.w1.as<uint8_t>(), X.s1.as<uint8_t>(), I, groups, NK,
                                                         goff, gexp, row_index, g, st()));
      RETURN_IF_ERROR(cuda::MxFp4GroupedMatMulTensorCore(xb, d, X.w3.as<uint8_t>(), X.s3.as<uint8_t>(), I, groups, NK,
                                                         goff, gexp, row_index, u, st()));
      RETURN_IF_ERROR(cuda::SwiGlu(g, u, NK * I, limit, g, st()));
      ASSIGN_OR_RETURN(uint16_t* hb, Scratch<uint16_t>(NK * I));
      RETURN_IF_ERROR(cuda::F32ToBf16(g, NK * I, hb, st()));
      RETURN_IF_ERROR(cuda::MxFp4GroupedMatMulTensorCore(hb, I, X.w2.as<uint8_t>(), X.s2.as<uint8_t>(), d, groups, NK,
                                                         goff, gexp, nullptr, y, st()));
    } else if (X.mxfp4) {
      // Few rows per expert: gate, up and SwiGLU in one launch, then the down
      // projection (the decode kernels of mxfp4.cuh; f32-accurate).
      RETURN_IF_ERROR(cuda::MxFp4GroupedGateUp(x, d, X.w1.as<uint8_t>(), X.s1.as<uint8_t>(), X.w3.as<uint8_t>(),
                                               X.s3.as<uint8_t>(), I, limit, groups, goff, gexp, row_index, g,
                                               st()));
      RETURN_IF_ERROR(cuda::MxFp4GroupedMatMulDecode(g, I, X.w2.as<uint8_t>(), X.s2.as<uint8_t>(), d, groups, goff,
                                                     gexp, nullptr, y, st()));
    } else {
      // Dense (HF-layout) experts: the group table comes to the host, one
      // cuBLAS GEMM per active expert on gathered rows.
      if (capturing) return absl::FailedPreconditionError("CUDA graphs need MXFP4 experts (dense experts sync)");
      ASSIGN_OR_RETURN(float* xg, Scratch<float>(NK * d));
      RETURN_IF_ERROR(cuda::GatherRows(x, row_index, NK, d, xg, st()));
      std::vector<int32_t> off(groups + 1), ex(groups);
      RETORT_CUDA_RETURN(cudaMemcpyAsync(off.data(), goff, sizeof(int32_t) * (groups + 1), cudaMemcpyDeviceToHost, st()));
      RETORT_CUDA_RETURN(cudaMemcpyAsync(ex.data(), gexp, sizeof(int32_t) * groups, cudaMemcpyDeviceToHost, st()));
      RETURN_IF_ERROR(stream.Synchronize());
      for (int gi = 0; gi < groups; ++gi) {
        const int64_t m0 = off[gi], n = off[gi + 1] - off[gi];
        if (n == 0) continue;
        const int64_t e = ex[gi];
        RETURN_IF_ERROR(cuda::MatMulF32(Blas(), xg + m0 * d, n, d, X.w1.as<float>() + e * I * d, I, g + m0 * I, st()));
        RETURN_IF_ERROR(cuda::MatMulF32(Blas(), xg + m0 * d, n, d, X.w3.as<float>() + e * I * d, I, u + m0 * I, st()));
      }
      RETURN_IF_ERROR(cuda::SwiGlu(g, u, NK * I, limit, g, st()));
      for (int gi = 0; gi < groups; ++gi) {
        const int64_t m0 = off[gi], n = off[gi + 1] - off[gi];
        if (n == 0) continue;
        const int64_t e = ex[gi];
        RETURN_IF_ERROR(cuda::MatMulF32(Blas(), g + m0 * I, n, I, X.w2.as<float>() + e * d * I, d, y + m0 * d, st()));
      }
    }
    if (shared_branch) RETURN_IF_ERROR(Join(0));
    if (L.has_shared && !shared_branch) {
      RETURN_IF_ERROR(Mark("moe.shared"));
      RETURN_IF_ERROR(shared_expert());
    }
    RETURN_IF_ERROR(Mark("moe.combine"));
    return cuda::MoeCombine(y, slot_pos, wts, N, K, d, shared, out, st());
  }

  // Checks the chunks and builds the plan; changes nothing.
  absl::StatusOr<StepPlan> Plan(absl::Span<const CudaModel::Chunk> chunks, bool graph_bounds) const {
    StepPlan p;
    p.S = static_cast<int>(chunks.size());
    for (size_t s = 0; s < chunks.size(); ++s) {
      const int seq = chunks[s].seq;
      if (seq < 0 || seq >= static_cast<int>(lengths.size()) || lengths[seq] < 0)
        return absl::InvalidArgumentError(absl::StrCat("chunk ", s, ": sequence ", seq, " is not in use"));
      for (size_t j = s + 1; j < chunks.size(); ++j)
        if (chunks[j].seq == seq)
          return absl::InvalidArgumentError(absl::StrCat("chunks ", s, " and ", j, " share sequence ", seq));
      const int64_t T = static_cast<int64_t>(chunks[s].tokens.size());
      if (lengths[seq] + T > options.max_length)
        return absl::ResourceExhaustedError(absl::StrCat("chunk ", s, ": sequence ", seq, " would hold ",
                                                         lengths[seq] + T, " tokens; the slots hold max_length ",
                                                         options.max_length));
      for (int64_t t : chunks[s].tokens)
        if (t < 0 || t >= config.vocab_size)
          return absl::InvalidArgumentError(absl::StrCat("chunk ", s, ": token id ", t,
                                                         " is outside the vocabulary [0, ", config.vocab_size, ")"));
      p.seq_slot.push_back(seq);
      p.seq_p0.push_back(lengths[seq]);
      p.seq_row0.push_back(static_cast<int32_t>(p.N));
      p.seq_T.push_back(static_cast<int32_t>(T));
      p.max_T = std::max(p.max_T, T);
      for (int64_t t = 0; t < T; ++t) {
        p.row_seq.push_back(static_cast<int32_t>(s));
        p.row_slot.push_back(seq);
        p.positions.push_back(lengths[seq] + t);
        p.tokens.push_back(chunks[s].tokens[t]);
      }
      p.N += T;
    }
    for (int l = 0; l < config.num_layers; ++l) {
      const int m = config.compress_ratio[l];
      if (config.attention[l] == AttentionKind::kSliding || p.visible.count(m)) continue;
      auto& v = p.visible[m];
      int64_t bound = 0;
      for (int64_t pos : p.positions) {
        v.push_back(static_cast<int32_t>((pos + 1) / m));
        bound = std::max<int64_t>(bound, (pos + 1) / m);
      }
      p.visible_bound[m] = graph_bounds ? options.max_length / m : bound;
    }
    for (int64_t pos : p.positions) p.max_position = std::max(p.max_position, pos);
    if (graph_bounds) p.max_position = options.max_length;
    return p;
  }

  // Packs the plan into the pinned buffer of `bufs` (same layout for the same
  // row and chunk counts) and, unless this is a graph replay (whose memcpy
  // node copies the pinned buffer), enqueues its copy to the device.
  absl::Status PackPlan(const StepPlan& p, StepBuffers& bufs, bool enqueue_copy) {
    cuda::PinnedHostBuffer& meta_host = bufs.meta_host;
    DeviceBuffer& meta_dev = bufs.meta_dev;
    size_t bytes = 0;
    auto add = [&](size_t n) {
      const size_t at = bytes;
      bytes += (n + 255) / 256 * 256;
      return at;
    };
    const size_t o_row_seq = add(4 * p.N), o_seq_slot = add(4 * p.S), o_seq_row0 = add(4 * p.S),
                 o_seq_T = add(4 * p.S), o_row_slot = add(4 * p.N), o_pos = add(8 * p.N), o_tok = add(8 * p.N),
                 o_p0 = add(8 * p.S);
    std::map<int, size_t> o_vis;
    for (const auto& [m, v] : p.visible) o_vis[m] = add(4 * p.N);
    if (meta_host.bytes() < bytes) {
      if (!enqueue_copy) return absl::InternalError("graph replay with a larger plan than captured");
      ASSIGN_OR_RETURN(meta_host, cuda::PinnedHostBuffer::Allocate(bytes * 2));
      ASSIGN_OR_RETURN(meta_dev, DeviceBuffer::Allocate(bytes * 2));
    }
    auto* h = static_cast<uint8_t*>(meta_host.get());
    auto put = [&](size_t at, const auto& v) {
      if (!v.empty()) std::memcpy(h + at, v.data(), v.size() * sizeof(v[0]));
    };
    put(o_row_seq, p.row_seq), put(o_seq_slot, p.seq_slot), put(o_seq_row0, p.seq_row0), put(o_seq_T, p.seq_T);
    put(o_row_slot, p.row_slot), put(o_pos, p.positions), put(o_tok, p.tokens), put(o_p0, p.seq_p0);
    for (const auto& [m, v] : p.visible) put(o_vis.at(m), v);
    if (enqueue_copy)
      RETORT_CUDA_RETURN(cudaMemcpyAsync(meta_dev.get(), meta_host.get(), bytes, cudaMemcpyHostToDevice, st()));
    auto* d = meta_dev.as<uint8_t>();
    d_row_seq = reinterpret_cast<const int32_t*>(d + o_row_seq);
    d_seq_slot = reinterpret_cast<const int32_t*>(d + o_seq_slot);
    d_seq_row0 = reinterpret_cast<const int32_t*>(d + o_seq_row0);
    d_seq_T = reinterpret_cast<const int32_t*>(d + o_seq_T);
    d_row_slot = reinterpret_cast<const int32_t*>(d + o_row_slot);
    d_positions = reinterpret_cast<const int64_t*>(d + o_pos);
    d_tokens = reinterpret_cast<const int64_t*>(d + o_tok);
    d_seq_p0 = reinterpret_cast<const int64_t*>(d + o_p0);
    d_visible.clear();
    for (const auto& [m, at] : o_vis) d_visible[m] = reinterpret_cast<const int32_t*>(d + at);
    return absl::OkStatus();
  }

  // The forward of a step after its plan is on the device; logits -> bufs.logits.
  absl::Status Forward(const StepPlan& plan, StepBuffers& bufs) {
    DeviceBuffer& logits = bufs.logits;
    const auto& c = config;
    const int hc = c.hc_mult;
    const int64_t N = plan.N, d = c.hidden_size, V = c.vocab_size;
    const cuda::HcParams hp = Hc();
    fork_used = 0;
    RETURN_IF_ERROR(Mark("embed"));
    ASSIGN_OR_RETURN(float* X, Scratch<float>(N * hc * d));
    ASSIGN_OR_RETURN(float* u, Scratch<float>(N * d));
    ASSIGN_OR_RETURN(float* xn, Scratch<float>(N * d));
    ASSIGN_OR_RETURN(float* F, Scratch<float>(N * d));
    ASSIGN_OR_RETURN(float* post, Scratch<float>(N * hc));
    ASSIGN_OR_RETURN(float* comb, Scratch<float>(N * hc * hc));
    ASSIGN_OR_RETURN(float* hc_scratch, Scratch<float>(cuda::HcScratchFloats(hp, N)));
    RETURN_IF_ERROR(cuda::EmbedToStreams(embed.as<float>(), d_tokens, N, d, hc, X, st()));
    for (int l = 0; l < c.num_layers; ++l) {
      const DeviceLayer& L = layers[l];
      RETURN_IF_ERROR(Mark("mhc+norm"));
      RETURN_IF_ERROR(cuda::HcPre(hp, X, N, L.attn_hc.fn.as<float>(), L.attn_hc.base.as<float>(),
                                  L.attn_hc.scale.as<float>(), u, post, comb, hc_scratch, st()));
      ASSIGN_OR_RETURN(const uint16_t* xq, Norm(u, N, d, L.attn_norm, xn, L.wq_a.kind == WeightKind::kFp8));
      RETURN_IF_ERROR(Attention(l, xn, xq, plan, F));
      RETURN_IF_ERROR(Mark("mhc+norm"));
      RETURN_IF_ERROR(cuda::HcPost(hp, F, post, comb, N, X, st()));
      RETURN_IF_ERROR(cuda::HcPre(hp, X, N, L.ffn_hc.fn.as<float>(), L.ffn_hc.base.as<float>(),
                                  L.ffn_hc.scale.as<float>(), u, post, comb, hc_scratch, st()));
      ASSIGN_OR_RETURN(const uint16_t* fq,
                       Norm(u, N, d, L.ffn_norm, xn, L.has_shared && L.sh_w1.kind == WeightKind::kFp8));
      RETURN_IF_ERROR(Moe(l, xn, fq, plan, F));
      RETURN_IF_ERROR(Mark("mhc+norm"));
      RETURN_IF_ERROR(cuda::HcPost(hp, F, post, comb, N, X, st()));
    }
    RETURN_IF_ERROR(Mark("head"));
    RETURN_IF_ERROR(cuda::HcHead(hp, X, N, hc_head.fn.as<float>(), hc_head.base.as<float>(),
                                 hc_head.scale.as<float>(), u, hc_scratch, st()));
    RETURN_IF_ERROR(cuda::RmsNorm(u, N, d, norm.as<float>(), Eps(), u, st()));
    if (logits.bytes() < sizeof(float) * N * V) {
      logits = DeviceBuffer();
      ASSIGN_OR_RETURN(logits, DeviceBuffer::Allocate(sizeof(float) * N * V));
    }
    RETURN_IF_ERROR(Apply(head, u, N, logits.as<float>()));
    return Mark("end");
  }

  absl::StatusOr<const float*> RunStep(absl::Span<const CudaModel::Chunk> chunks) {
    if (broken) return absl::FailedPreconditionError("an earlier CUDA failure left this model unusable");
    ASSIGN_OR_RETURN(StepPlan plan, Plan(chunks, false));
    if (plan.N == 0) return eager_bufs.logits.as<float>();
    absl::Status s = PackPlan(plan, eager_bufs, true);
    if (s.ok()) s = Forward(plan, eager_bufs);
    if (s.ok()) s = stream.Synchronize();
    FreeStepAllocs();
    if (!s.ok()) {
      broken = true;
      return s;
    }
    RETURN_IF_ERROR(CollectProfile());
    for (const auto& ch : chunks) lengths[ch.seq] += static_cast<int64_t>(ch.tokens.size());
    return eager_bufs.logits.as<float>();
  }

  absl::Status AllocatePools() {
    const auto& c = config;
    const int64_t S = options.max_sequences, L = options.max_length;
    pools.resize(c.num_layers);
    auto comp_pool = [&](CompressorPool& p, int m, int64_t dim, bool overlap) -> absl::Status {
      const int64_t w = (overlap ? 2 : 1) * dim;
      p.cap = L / m + 1;
      ASSIGN_OR_RETURN(p.pending_kv, ZerosBuffer(sizeof(float) * S * m * w));
      ASSIGN_OR_RETURN(p.pending_score, ZerosBuffer(sizeof(float) * S * m * w));
      if (overlap) {
        ASSIGN_OR_RETURN(p.prev_kv, ZerosBuffer(sizeof(float) * S * m * dim));
        ASSIGN_OR_RETURN(p.prev_score, ZerosBuffer(sizeof(float) * S * m * dim));
      }
      ASSIGN_OR_RETURN(p.entries, ZerosBuffer(sizeof(float) * S * p.cap * dim));
      return absl::OkStatus();
    };
    for (int l = 0; l < c.num_layers; ++l) {
      LayerPool& P = pools[l];
      ASSIGN_OR_RETURN(P.ring, ZerosBuffer(sizeof(float) * S * c.sliding_window * c.head_dim));
      if (c.attention[l] != AttentionKind::kSliding)
        RETURN_IF_ERROR(comp_pool(P.kv, c.compress_ratio[l], c.head_dim, c.attention[l] == AttentionKind::kCsa));
      if (c.attention[l] == AttentionKind::kCsa)
        RETURN_IF_ERROR(comp_pool(P.index, c.compress_ratio[l], c.index_head_dim, true));
    }
    lengths.assign(S, -1);
    return absl::OkStatus();
  }

  absl::Status InitRuntime() {
    RETORT_CUDA_RETURN(cudaSetDevice(options.device));
    ASSIGN_OR_RETURN(stream, cuda::Stream::Create());
    for (cuda::Stream& s : side) {
      ASSIGN_OR_RETURN(s, cuda::Stream::Create());
    }
    ASSIGN_OR_RETURN(blas, cuda::Blas::Create());
    // A fixed cuBLAS workspace so GEMMs can be captured in CUDA graphs.
    ASSIGN_OR_RETURN(blas_workspace, DeviceBuffer::Allocate(size_t{32} << 20));
    if (cublasSetWorkspace(blas.get(), blas_workspace.get(), blas_workspace.bytes()) != CUBLAS_STATUS_SUCCESS)
      return absl::InternalError("cublasSetWorkspace failed");
    for (int i = 0; i < 2; ++i) {
      ASSIGN_OR_RETURN(side_blas[i], cuda::Blas::Create());
      ASSIGN_OR_RETURN(side_blas_workspace[i], DeviceBuffer::Allocate(blas_workspace.bytes()));
      if (cublasSetWorkspace(side_blas[i].get(), side_blas_workspace[i].get(), side_blas_workspace[i].bytes()) !=
          CUBLAS_STATUS_SUCCESS)
        return absl::InternalError("cublasSetWorkspace failed");
    }
    for (int k = 0; k < 2; ++k) {
      ASSIGN_OR_RETURN(inv_freq[k], UploadBytes(inv_freq_host[k].data(), sizeof(float) * inv_freq_host[k].size()));
    }
    return absl::OkStatus();
  }
};

namespace {

absl::Status CheckSupported(const io::V4Config& c, const CudaModelOptions& o) {
  if (cuda::DeviceCount() == 0) return absl::FailedPreconditionError("no CUDA device is present");
  if (o.max_sequences < 1 || o.max_length < 1)
    return absl::InvalidArgumentError(absl::StrCat("CudaModelOptions: max_sequences ", o.max_sequences,
                                                   " and max_length ", o.max_length, " must be >= 1"));
  if (c.hc_mult > 4) return absl::InvalidArgumentError(absl::StrCat("hc_mult ", c.hc_mult, " > 4 is not supported"));
  if (c.head_dim % 32 || c.head_dim > 512)
    return absl::InvalidArgumentError(absl::StrCat("head_dim ", c.head_dim, " must be a multiple of 32, <= 512"));
  return absl::OkStatus();
}

absl::StatusOr<DeviceHc> UploadHc(const HyperConnection& h) {
  DeviceHc d;
  ASSIGN_OR_RETURN(d.fn, UploadTensor(h.fn));
  ASSIGN_OR_RETURN(d.base, UploadTensor(h.base));
  ASSIGN_OR_RETURN(d.scale, UploadTensor(h.scale));
  return d;
}

absl::StatusOr<DeviceCompressor> UploadCompressor(const Compressor& k, bool bf16) {
  DeviceCompressor d;
  d.ratio = k.ratio, d.dim = k.dim, d.overlap = k.overlap;
  ASSIGN_OR_RETURN(d.wkv, UploadLinear(k.wkv, bf16));
  ASSIGN_OR_RETURN(d.wgate, UploadLinear(k.wgate, bf16));
  ASSIGN_OR_RETURN(d.ape, UploadTensor(k.ape));
  ASSIGN_OR_RETURN(d.norm, UploadTensor(k.norm));
  return d;
}

// Stacks the experts' matrices [E, out, ...] on the host, then uploads.
absl::StatusOr<ExpertStack> UploadExperts(const std::vector<Expert>& experts) {
  ExpertStack s;
  s.mxfp4 = experts.front().w1.mxfp4;
  auto stack = [&](auto pick, bool scales) -> absl::StatusOr<DeviceBuffer> {
    std::vector<uint8_t> h;
    for (const Expert& e : experts) {
      const Linear& l = pick(e);
      if (l.mxfp4 != s.mxfp4) return absl::InvalidArgumentError("experts mix MXFP4 and dense weights");
      const Tensor& t = scales ? l.scales : l.weight;
      h.insert(h.end(), t.raw(), t.raw() + t.nbytes());
    }
    return UploadBytes(h.data(), h.size());
  };
  auto w1 = [](const Expert& e) -> const Linear& { return e.w1; };
  auto w3 = [](const Expert& e) -> const Linear& { return e.w3; };
  auto w2 = [](const Expert& e) -> const Linear& { return e.w2; };
  ASSIGN_OR_RETURN(s.w1, stack(w1, false));
  ASSIGN_OR_RETURN(s.w3, stack(w3, false));
  ASSIGN_OR_RETURN(s.w2, stack(w2, false));
  if (s.mxfp4) {
    ASSIGN_OR_RETURN(s.s1, stack(w1, true));
    ASSIGN_OR_RETURN(s.s3, stack(w3, true));
    ASSIGN_OR_RETURN(s.s2, stack(w2, true));
  }
  return s;
}

}  // namespace

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() = default;

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::Create(const Model& host, const CudaModelOptions& options) {
  const auto& c = host.config();
  RETURN_IF_ERROR(CheckSupported(c, options));
  auto impl = std::make_unique<Impl>();
  impl->config = c;
  impl->options = options;
  impl->inv_freq_host[0] = host.inv_freq(0);
  impl->inv_freq_host[1] = host.inv_freq(1);
  RETURN_IF_ERROR(impl->InitRuntime());
  const bool bf16 = options.numerics == Numerics::kDeployment;
  impl->dense_bf16 = bf16;
  const Weights& w = host.weights();
  ASSIGN_OR_RETURN(impl->embed, UploadTensor(w.embed));
  for (int l = 0; l < c.num_layers; ++l) {
    const Layer& L = w.layers[l];
    DeviceLayer D;
    D.kind = L.attn.kind;
    ASSIGN_OR_RETURN(D.attn_hc, UploadHc(L.attn_hc));
    ASSIGN_OR_RETURN(D.ffn_hc, UploadHc(L.ffn_hc));
    ASSIGN_OR_RETURN(D.attn_norm, UploadTensor(L.attn_norm));
    ASSIGN_OR_RETURN(D.ffn_norm, UploadTensor(L.ffn_norm));
    const Attention& a = L.attn;
    ASSIGN_OR_RETURN(D.wq_a, UploadLinear(a.wq_a, bf16));
    ASSIGN_OR_RETURN(D.wq_b, UploadLinear(a.wq_b, bf16));
    ASSIGN_OR_RETURN(D.wkv, UploadLinear(a.wkv, bf16));
    ASSIGN_OR_RETURN(D.wo_b, UploadLinear(a.wo_b, bf16));
    if (a.wo_a.mxfp4) return absl::InvalidArgumentError(absl::StrCat("layer ", l, ": MXFP4 wo_a is not supported"));
    ASSIGN_OR_RETURN(D.wo_a, UploadLinear(a.wo_a, bf16));
    if (D.wo_a.kind == WeightKind::kFp8 && c.o_groups > 1 && c.o_lora_rank % 2 != 0) {
      // The few-row kernel's row pairs must not straddle two groups.
      ASSIGN_OR_RETURN(DeviceBuffer f, UploadTensor(a.wo_a.weight));
      D.wo_a.kind = WeightKind::kBf16;
      D.wo_a.scales = DeviceBuffer();
      ASSIGN_OR_RETURN(D.wo_a.w, ToBf16(f, a.wo_a.out * a.wo_a.in));
    }
    ASSIGN_OR_RETURN(D.q_norm, UploadTensor(a.q_norm));
    ASSIGN_OR_RETURN(D.kv_norm, UploadTensor(a.kv_norm));
    ASSIGN_OR_RETURN(D.sinks, UploadTensor(a.sinks));
    if (a.kind != AttentionKind::kSliding) {
      ASSIGN_OR_RETURN(D.comp, UploadCompressor(a.compressor, bf16));
    }
    if (a.kind == AttentionKind::kCsa) {
      ASSIGN_OR_RETURN(D.idx_wq_b, UploadLinear(a.indexer.wq_b, bf16));
      ASSIGN_OR_RETURN(D.idx_wproj, UploadLinear(a.indexer.weights_proj, bf16));
      ASSIGN_OR_RETURN(D.idx_comp, UploadCompressor(a.indexer.compressor, bf16));
    }
    const Moe& moe = L.moe;
    D.hash_routed = moe.hash_routed;
    ASSIGN_OR_RETURN(D.gate, UploadTensor(moe.gate));
    ASSIGN_OR_RETURN(D.bias, UploadTensor(moe.bias));
    ASSIGN_OR_RETURN(D.tid2eid, UploadTensor(moe.tid2eid));
    ASSIGN_OR_RETURN(D.experts, UploadExperts(moe.experts));
    D.has_shared = moe.has_shared;
    if (moe.has_shared) {
      ASSIGN_OR_RETURN(D.sh_w1, UploadLinear(moe.shared.w1, bf16));
      ASSIGN_OR_RETURN(D.sh_w3, UploadLinear(moe.shared.w3, bf16));
      ASSIGN_OR_RETURN(D.sh_w2, UploadLinear(moe.shared.w2, bf16));
    }
    impl->layers.push_back(std::move(D));
  }
  ASSIGN_OR_RETURN(impl->hc_head, UploadHc(w.hc_head));
  ASSIGN_OR_RETURN(impl->norm, UploadTensor(w.norm));
  ASSIGN_OR_RETURN(impl->head, UploadLinear(w.head, bf16));
  RETURN_IF_ERROR(impl->AllocatePools());
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<CudaModel>> CudaModel::CreateRandom(const io::V4Config& c,
                                                                   const CudaModelOptions& options, uint64_t seed) {
  RETURN_IF_ERROR(CheckSupported(c, options));
  auto impl = std::make_unique<Impl>();
  impl->config = c;
  impl->options = options;
  impl->inv_freq_host[0] = RopeInverseFrequencies(c.main_rope, c.rope_dim);
  impl->inv_freq_host[1] = RopeInverseFrequencies(c.compress_rope, c.rope_dim);
  RETURN_IF_ERROR(impl->InitRuntime());
  const bool bf16 = options.numerics == Numerics::kDeployment;
  impl->dense_bf16 = bf16;
  const WeightKind dense = bf16 ? WeightKind::kBf16 : WeightKind::kF32;
  // The matrices V4 checkpoints ship FP8 (V4_SPEC §4: attention, indexer
  // wq_b, shared expert) are FP8 in deployment numerics, as a loaded
  // checkpoint's are.
  const WeightKind fp8 = bf16 ? WeightKind::kFp8 : WeightKind::kF32;
  uint64_t s = seed * 1000003;
  auto next = [&] { return s += 7919; };
  const int hc = c.hc_mult;
  const int64_t d = c.hidden_size, D = c.head_dim, H = c.num_heads;
  auto hc_weights = [&](int rows) -> absl::StatusOr<DeviceHc> {
    DeviceHc h;
    ASSIGN_OR_RETURN(h.fn, RandomF32(rows * hc * d, next(), -0.01f, 0.01f));
    ASSIGN_OR_RETURN(h.base, RandomF32(rows, next(), -0.5f, 0.5f));
    ASSIGN_OR_RETURN(h.scale, ConstF32(rows == hc ? 1 : 3, 1.0f));
    return h;
  };
  auto compressor = [&](int m, int64_t dim, bool overlap) -> absl::StatusOr<DeviceCompressor> {
    DeviceCompressor k;
    k.ratio = m, k.dim = dim, k.overlap = overlap;
    const int64_t w = (overlap ? 2 : 1) * dim;
    ASSIGN_OR_RETURN(k.wkv, RandomLinear(w, d, dense, next()));
    ASSIGN_OR_RETURN(k.wgate, RandomLinear(w, d, dense, next()));
    ASSIGN_OR_RETURN(k.ape, RandomF32(m * w, next(), -0.1f, 0.1f));
    ASSIGN_OR_RETURN(k.norm, ConstF32(dim, 1.0f));
    return k;
  };
  ASSIGN_OR_RETURN(impl->embed, RandomF32(c.vocab_size * d, next(), -1.0f, 1.0f));
  const int E = c.n_routed_experts;
  const int64_t I = c.moe_intermediate;
  for (int l = 0; l < c.num_layers; ++l) {
    DeviceLayer L;
    L.kind = c.attention[l];
    ASSIGN_OR_RETURN(L.attn_hc, hc_weights((2 + hc) * hc));
    ASSIGN_OR_RETURN(L.ffn_hc, hc_weights((2 + hc) * hc));
    ASSIGN_OR_RETURN(L.attn_norm, ConstF32(d, 1.0f));
    ASSIGN_OR_RETURN(L.ffn_norm, ConstF32(d, 1.0f));
    ASSIGN_OR_RETURN(L.wq_a, RandomLinear(c.q_lora_rank, d, fp8, next()));
    ASSIGN_OR_RETURN(L.wq_b, RandomLinear(H * D, c.q_lora_rank, fp8, next()));
    ASSIGN_OR_RETURN(L.wkv, RandomLinear(D, d, fp8, next()));
    const int64_t per = H * D / c.o_groups;
    ASSIGN_OR_RETURN(L.wo_a, RandomLinear(c.o_groups * c.o_lora_rank, per, fp8, next()));
    ASSIGN_OR_RETURN(L.wo_b, RandomLinear(d, c.o_groups * c.o_lora_rank, fp8, next()));
    ASSIGN_OR_RETURN(L.q_norm, ConstF32(c.q_lora_rank, 1.0f));
    ASSIGN_OR_RETURN(L.kv_norm, ConstF32(D, 1.0f));
    ASSIGN_OR_RETURN(L.sinks, ConstF32(H, 0.0f));
    const int m = c.compress_ratio[l];
    if (L.kind != AttentionKind::kSliding) {
      ASSIGN_OR_RETURN(L.comp, compressor(m, D, L.kind == AttentionKind::kCsa));
    }
    if (L.kind == AttentionKind::kCsa) {
      ASSIGN_OR_RETURN(L.idx_wq_b, RandomLinear(c.index_n_heads * c.index_head_dim, c.q_lora_rank, fp8, next()));
      ASSIGN_OR_RETURN(L.idx_wproj, RandomLinear(c.index_n_heads, d, dense, next()));
      ASSIGN_OR_RETURN(L.idx_comp, compressor(m, c.index_head_dim, true));
    }
    if (c.hash_routed.size() > static_cast<size_t>(l) && c.hash_routed[l])
      return absl::InvalidArgumentError("CreateRandom: hash-routed layers are not generated");
    const float ga = std::sqrt(3.0f / static_cast<float>(d));
    ASSIGN_OR_RETURN(L.gate, RandomF32(E * d, next(), -ga, ga));
    ASSIGN_OR_RETURN(L.bias, ConstF32(E, 0.0f));
    ExpertStack& X = L.experts;
    X.mxfp4 = true;
    ASSIGN_OR_RETURN(DeviceLinear w1, RandomLinear(E * I, d, WeightKind::kMxFp4, next()));
    ASSIGN_OR_RETURN(DeviceLinear w3, RandomLinear(E * I, d, WeightKind::kMxFp4, next()));
    ASSIGN_OR_RETURN(DeviceLinear w2, RandomLinear(E * d, I, WeightKind::kMxFp4, next()));
    X.w1 = std::move(w1.w), X.s1 = std::move(w1.scales);
    X.w3 = std::move(w3.w), X.s3 = std::move(w3.scales);
    X.w2 = std::move(w2.w), X.s2 = std::move(w2.scales);
    L.has_shared = c.n_shared_experts > 0;
    if (L.has_shared) {
      const int64_t Is = I * c.n_shared_experts;
      ASSIGN_OR_RETURN(L.sh_w1, RandomLinear(Is, d, fp8, next()));
      ASSIGN_OR_RETURN(L.sh_w3, RandomLinear(Is, d, fp8, next()));
      ASSIGN_OR_RETURN(L.sh_w2, RandomLinear(d, Is, fp8, next()));
    }
    impl->layers.push_back(std::move(L));
  }
  ASSIGN_OR_RETURN(impl->hc_head, hc_weights(hc));
  ASSIGN_OR_RETURN(impl->norm, ConstF32(d, 1.0f));
  ASSIGN_OR_RETURN(impl->head, RandomLinear(c.vocab_size, d, dense, next()));
  RETORT_CUDA_RETURN(cudaDeviceSynchronize());
  RETURN_IF_ERROR(impl->AllocatePools());
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

const io::V4Config& CudaModel::config() const { return impl_->config; }
const CudaModelOptions& CudaModel::options() const { return impl_->options; }

absl::StatusOr<int> CudaModel::NewSequence() {
  auto& len = impl_->lengths;
  for (size_t i = 0; i < len.size(); ++i)
    if (len[i] < 0) {
      len[i] = 0;
      return static_cast<int>(i);
    }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", len.size(), " sequence slots are in use (CudaModelOptions.max_sequences)"));
}

void CudaModel::Release(int seq) {
  if (seq >= 0 && seq < static_cast<int>(impl_->lengths.size())) impl_->lengths[seq] = -1;
}

int64_t CudaModel::Length(int seq) const {
  if (seq < 0 || seq >= static_cast<int>(impl_->lengths.size())) return -1;
  return impl_->lengths[seq];
}

absl::Status CudaModel::CopySequence(int from, int to) {
  Impl& m = *impl_;
  if (Length(from) < 0 || Length(to) < 0)
    return absl::InvalidArgumentError(absl::StrCat("CopySequence: sequence ", from, " or ", to, " is not in use"));
  if (from == to) return absl::OkStatus();
  const int64_t S = m.options.max_sequences;
  auto copy = [&](const DeviceBuffer& b) -> absl::Status {
    if (!b.get()) return absl::OkStatus();
    const size_t per = b.bytes() / S;
    RETORT_CUDA_RETURN(cudaMemcpyAsync(b.as<uint8_t>() + to * per, b.as<uint8_t>() + from * per, per,
                                       cudaMemcpyDeviceToDevice, m.st()));
    return absl::OkStatus();
  };
  for (LayerPool& P : m.pools) {
    RETURN_IF_ERROR(copy(P.ring));
    for (CompressorPool* c : {&P.kv, &P.index})
      for (const DeviceBuffer* b : {&c->pending_kv, &c->pending_score, &c->prev_kv, &c->prev_score, &c->entries})
        RETURN_IF_ERROR(copy(*b));
  }
  RETURN_IF_ERROR(m.stream.Synchronize());
  m.lengths[to] = m.lengths[from];
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> CudaModel::Step(absl::Span<const Chunk> chunks) {
  int64_t rows = 0;
  for (const auto& ch : chunks) rows += static_cast<int64_t>(ch.tokens.size());
  ASSIGN_OR_RETURN(const float* d, impl_->RunStep(chunks));
  std::vector<float> out(rows * impl_->config.vocab_size);
  if (rows) RETURN_IF_ERROR(cuda::CopyToHost(out.data(), d, sizeof(float) * out.size()));
  return out;
}

absl::StatusOr<const float*> CudaModel::StepOnDevice(absl::Span<const Chunk> chunks) { return impl_->RunStep(chunks); }

absl::StatusOr<const float*> CudaModel::DecodeGraph(absl::Span<const int> seqs, absl::Span<const int64_t> tokens) {
  Impl& m = *impl_;
  if (seqs.size() != tokens.size())
    return absl::InvalidArgumentError(absl::StrCat("DecodeGraph: ", seqs.size(), " sequences but ", tokens.size(),
                                                   " tokens"));
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < seqs.size(); ++i) chunks.push_back({seqs[i], tokens.subspan(i, 1)});
  if (m.broken) return absl::FailedPreconditionError("an earlier CUDA failure left this model unusable");
  const std::vector<int> key(seqs.begin(), seqs.end());
  if (key != m.graph_seqs) {
    if (m.graph_exec) cudaGraphExecDestroy(m.graph_exec);
    m.graph_exec = nullptr;
    m.graph_seqs = key;
    m.graph_calls = 0;
  }
  ASSIGN_OR_RETURN(StepPlan plan, m.Plan(chunks, /*graph_bounds=*/true));
  absl::Status s;
  if (m.graph_calls++ == 0) {  // eager: warms the allocator's cache with this step's blocks
    s = m.PackPlan(plan, m.graph_bufs, true);
    if (s.ok()) s = m.Forward(plan, m.graph_bufs);
    if (s.ok()) s = m.stream.Synchronize();
    m.FreeStepAllocs();
    if (s.ok()) s = m.CollectProfile();
  } else {
    if (!m.graph_exec) {
      RETORT_CUDA_RETURN(cudaStreamBeginCapture(m.st(), cudaStreamCaptureModeRelaxed));
      m.capturing = true;
      s = m.PackPlan(plan, m.graph_bufs, true);
      if (s.ok()) s = m.Forward(plan, m.graph_bufs);
      m.capturing = false;
      cudaGraph_t graph = nullptr;
      const cudaError_t end = cudaStreamEndCapture(m.st(), &graph);
      m.FreeStepAllocs();  // the same blocks come back in the same order on replay
      if (s.ok()) s = cuda::CudaStatus(end, "cudaStreamEndCapture", __FILE__, __LINE__);
      if (s.ok()) s = cuda::CudaStatus(cudaGraphInstantiate(&m.graph_exec, graph, 0), "cudaGraphInstantiate",
                                       __FILE__, __LINE__);
      if (graph) cudaGraphDestroy(graph);
    } else {
      s = m.PackPlan(plan, m.graph_bufs, false);
    }
    if (s.ok()) s = cuda::CudaStatus(cudaGraphLaunch(m.graph_exec, m.st()), "cudaGraphLaunch", __FILE__, __LINE__);
    if (s.ok()) s = m.stream.Synchronize();
  }
  if (!s.ok()) {
    m.broken = true;
    return s;
  }
  for (const auto& ch : chunks) m.lengths[ch.seq] += 1;
  return m.graph_bufs.logits.as<float>();
}

absl::Status CudaModel::FillRandomState(int seq, int64_t length, uint64_t seed) {
  Impl& m = *impl_;
  if (Length(seq) < 0) return absl::InvalidArgumentError(absl::StrCat("FillRandomState: sequence ", seq, " is not in use"));
  if (length < 0 || length > m.options.max_length)
    return absl::InvalidArgumentError(absl::StrCat("FillRandomState: length ", length, " outside [0, max_length ",
                                                   m.options.max_length, "]"));
  const int64_t S = m.options.max_sequences;
  uint64_t s = seed * 7777 + 1;
  auto fill = [&](const DeviceBuffer& b) -> absl::Status {
    if (!b.get()) return absl::OkStatus();
    const int64_t per = static_cast<int64_t>(b.bytes() / S / sizeof(float));
    return cuda::FillUniform(b.as<float>() + seq * per, per, s += 13, -1.0f, 1.0f, m.st());
  };
  for (LayerPool& P : m.pools) {
    RETURN_IF_ERROR(fill(P.ring));
    for (CompressorPool* c : {&P.kv, &P.index})
      for (const DeviceBuffer* b : {&c->pending_kv, &c->pending_score, &c->prev_kv, &c->prev_score, &c->entries})
        RETURN_IF_ERROR(fill(*b));
  }
  RETURN_IF_ERROR(m.stream.Synchronize());
  m.lengths[seq] = length;
  return absl::OkStatus();
}

void CudaModel::SetProfiling(bool on) { impl_->profiling = on; }
CudaProfile CudaModel::TakeProfile() { return std::exchange(impl_->profile, CudaProfile{}); }

int64_t CudaModel::WeightBytes() const {
  const Impl& m = *impl_;
  int64_t b = static_cast<int64_t>(m.embed.bytes() + m.norm.bytes()) + m.hc_head.Bytes() + m.head.Bytes();
  for (const DeviceLayer& L : m.layers) {
    b += L.attn_hc.Bytes() + L.ffn_hc.Bytes() + static_cast<int64_t>(L.attn_norm.bytes() + L.ffn_norm.bytes());
    for (const DeviceLinear* x : {&L.wq_a, &L.wq_b, &L.wkv, &L.wo_b, &L.idx_wq_b, &L.idx_wproj, &L.comp.wkv,
                                  &L.comp.wgate, &L.idx_comp.wkv, &L.idx_comp.wgate, &L.sh_w1, &L.sh_w3, &L.sh_w2})
      b += x->Bytes();
    b += L.wo_a.Bytes() + static_cast<int64_t>(L.q_norm.bytes() + L.kv_norm.bytes() + L.sinks.bytes() +
                              L.gate.bytes() + L.bias.bytes() + L.comp.ape.bytes() + L.idx_comp.ape.bytes());
    b += L.experts.BytesPerExpert(1);
  }
  return b;
}

int64_t CudaModel::StatePoolBytes() const {
  int64_t b = 0;
  for (const LayerPool& P : impl_->pools) b += static_cast<int64_t>(P.ring.bytes()) + P.kv.Bytes() + P.index.Bytes();
  return b;
}

int64_t CudaModel::DecodeStepBytes(int64_t batch, int64_t context) const {
  const Impl& m = *impl_;
  const auto& c = m.config;
  const int E = c.n_routed_experts;
  int64_t b = WeightBytes() - static_cast<int64_t>(m.embed.bytes());
  b += batch * c.hidden_size * 4;  // the embedding rows
  for (int l = 0; l < c.num_layers; ++l) {
    const DeviceLayer& L = m.layers[l];
    const int64_t all = L.experts.BytesPerExpert(1), one = L.experts.BytesPerExpert(E);
    b -= all;
    b += std::min<int64_t>(E, batch * c.experts_per_token) * one;
    const int64_t win = std::min<int64_t>(context + 1, c.sliding_window);
    int64_t keys = win;
    if (L.kind != AttentionKind::kSliding) {
      const int64_t n = (context + 1) / c.compress_ratio[l];
      if (L.kind == AttentionKind::kHca) keys += n;
      else {
        keys += std::min<int64_t>(n, c.index_topk);
        b += batch * n * c.index_head_dim * 4;  // indexer keys scored
      }
    }
    b += batch * keys * c.head_dim * 4;
  }
  return b;
}

}  // namespace retort::v4
