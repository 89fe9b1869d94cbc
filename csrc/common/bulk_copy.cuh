// bulk_copy.cuh: Hopper (sm_90+) asynchronous bulk copies and the mbarriers they complete on,
// family-agnostic. A 1-D bulk copy (cp.async.bulk, the TMA engine without a tensor map) moves
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory and
// then counts them off the transaction count of an mbarrier in shared memory; a thread that
// waits on the barrier's phase then sees the data (PTX ISA: cp.async.bulk, mbarrier).
// Below sm_90 (a binary built for several archs) each call traps: callers pick these paths only
// on sm_90+.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FLASHJIT_SM90_ASM(...) __trap()
#else
#define FLASHJIT_SM90_ASM(...) asm volatile(__VA_ARGS__)
#endif

namespace flashjit {

// Order this thread's generic-proxy accesses of shared memory before later async-proxy ones
// (wgmma operand reads, bulk-copy writes), or the other way round.
__device__ __forceinline__ void fence_proxy_async_shared() {
  FLASHJIT_SM90_ASM("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// An mbarrier expecting `count` arrivals per phase.
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
  FLASHJIT_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Arrive (release: this thread's earlier shared-memory writes are seen by the waiters) and
// add `bytes` to the transaction count the phase waits for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  FLASHJIT_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Wait until the phase of parity `parity` has completed (acquire).
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  FLASHJIT_SM90_ASM(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Global -> shared bulk copy of `bytes`, completing on mbarrier `bar` (this CTA's own shared
// memory: a CTA's shared::cta address is its shared::cluster address).
__device__ __forceinline__ void bulk_copy_g2s(uint32_t smem, const void* gmem, uint32_t bytes,
                                              uint32_t bar) {
  FLASHJIT_SM90_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(smem),
      "l"(gmem), "r"(bytes), "r"(bar)
      : "memory");
}

// Shared -> global bulk reduction: adds the `bytes` / 4 floats at `smem` to those at `gmem`,
// element by element, each add atomic (as red.global.add.f32), in this thread's bulk group. The
// writers of the source make their stores visible to it with fence_proxy_async_shared() and a
// barrier before this thread issues it (PTX ISA: cp.reduce.async.bulk).
__device__ __forceinline__ void bulk_reduce_add_f32_s2g(float* gmem, uint32_t smem,
                                                        uint32_t bytes) {
  FLASHJIT_SM90_ASM(
      "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gmem),
      "r"(smem), "r"(bytes)
      : "memory");
}

// Close this thread's bulk group: the bulk operations issued since the last commit.
__device__ __forceinline__ void bulk_commit_group() {
  FLASHJIT_SM90_ASM("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Wait until at most kPending of this thread's committed bulk groups still read their shared
// memory source (which may then be overwritten), or, bulk_wait_group, are still incomplete.
template <int kPending>
__device__ __forceinline__ void bulk_wait_group_read() {
  FLASHJIT_SM90_ASM("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
template <int kPending>
__device__ __forceinline__ void bulk_wait_group() {
  FLASHJIT_SM90_ASM("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace flashjit

#undef FLASHJIT_SM90_ASM
