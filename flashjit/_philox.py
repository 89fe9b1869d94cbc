"""CPU reference of flashjit's dropout randomness (csrc/common/dropout.cuh), in plain Python integers.

Tests use it to cross-check the GPU keep mask bit for bit; nothing here touches torch or CUDA.

Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
SC'11): a counter-based generator; a 128-bit counter and a 64-bit key give four 32-bit words.
One round, with multipliers M0, M1 and the key (k0, k1):
    (c0, c1, c2, c3) -> (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))
and the key is bumped by the Weyl constants (W0, W1) between rounds (10 rounds, 9 bumps).

Dropout element (b, h, i, j) of an attention call (b: batch index or varlen sequence, h: query
head, i/j: query/key index inside the sequence) uses one call per lane of an m16 x n32 group
(16 elements, 8 random bits each):
    subseq  = ((b * heads + h) * ceil(max_seqlen_q / 16) + i // 16) * ceil(max_seqlen_k / 32)
              + j // 32 + offset                                   (mod 2**64)
    counter = ((i % 8) * 4 + (j % 8) // 2, 0, lo32(subseq), hi32(subseq))
    key     = (lo32(seed), hi32(seed))
    word    = philox4x32_10(counter, key)[(j % 32) // 8]
    byte    = (word >> 8 * (((i % 16) // 8) * 2 + j % 2)) & 0xFF
and is kept iff byte <= keep_threshold (= round(256 * (1 - p)) - 1, clamped to [0, 255]). The
kept fraction is keep_probability(p) = (keep_threshold + 1) / 256, 1 - p at a resolution of
1/256, and kept weights are scaled by its inverse (csrc/binding_utils.h), so the output stays
unbiased. One call consumes batch * heads * ceil(max_seqlen_q / 16) * ceil(max_seqlen_k / 32)
counters (`subseq` values): the caller advances the generator's offset by at least that much.
"""

from __future__ import annotations

import math

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key bumps (golden ratio, sqrt(3) - 1)


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Four 32-bit words of Philox4x32 with 10 rounds."""
    c0, c1, c2, c3 = (x & MASK32 for x in counter)
    k0, k1 = (x & MASK32 for x in key)
    for rnd in range(10):
        if rnd > 0:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        p0, p1 = PHILOX_M0 * c0, PHILOX_M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def keep_threshold(dropout_p: float) -> int:
    """The byte threshold of csrc/binding_utils.h: a uniform byte keeps its element iff it is <=
    threshold. round(256 (1 - p)) kept byte values, at least 1 (C's nearbyint: half to even)."""
    kept = min(max(round((1.0 - dropout_p) * 256.0), 1), 256)
    return kept - 1


def keep_probability(dropout_p: float) -> float:
    """The fraction of attention weights dropout keeps, (keep_threshold + 1) / 256: kept weights
    are scaled by its inverse."""
    return (keep_threshold(dropout_p) + 1) / 256.0


def philox_counters(batch: int, heads: int, max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Counters (subsequences) one attention call consumes."""
    return batch * heads * math.ceil(max_seqlen_q / 16) * math.ceil(max_seqlen_k / 32)


def dropout_byte(seed: int, offset: int, b: int, h: int, i: int, j: int, heads: int,
                 max_seqlen_q: int, max_seqlen_k: int) -> int:
    """The uniform byte that decides element (b, h, i, j)."""
    subseq = ((b * heads + h) * math.ceil(max_seqlen_q / 16) + i // 16)
    subseq = (subseq * math.ceil(max_seqlen_k / 32) + j // 32 + offset) & MASK64
    counter = ((i % 8) * 4 + (j % 8) // 2, 0, subseq & MASK32, subseq >> 32)
    seed &= MASK64
    word = philox4x32_10(counter, (seed & MASK32, seed >> 32))[(j % 32) // 8]
    return (word >> (8 * (((i % 16) // 8) * 2 + j % 2))) & 0xFF


def dropout_mask(seed: int, offset: int, batch: int, heads: int, seqlen_q: int, seqlen_k: int,
                 dropout_p: float) -> list:
    """Keep mask as nested lists [b][h][i][j] of 0/1 (fixed length; slow: for small tests).

    Philox is evaluated once per (b, h, m16 x n32 group, lane), as on the GPU.
    """
    threshold = keep_threshold(dropout_p)
    seed &= MASK64
    key = (seed & MASK32, seed >> 32)
    m16, n32 = math.ceil(seqlen_q / 16), math.ceil(seqlen_k / 32)
    mask = [[[[0] * seqlen_k for _ in range(seqlen_q)] for _ in range(heads)] for _ in range(batch)]
    for b in range(batch):
        for h in range(heads):
            for i16 in range(m16):
                for j32 in range(n32):
                    subseq = (((b * heads + h) * m16 + i16) * n32 + j32 + offset) & MASK64
                    for g in range(8):
                        for t in range(4):
                            counter = (g * 4 + t, 0, subseq & MASK32, subseq >> 32)
                            words = philox4x32_10(counter, key)
                            for w in range(4):
                                for half in range(2):
                                    for e in range(2):
                                        i = i16 * 16 + half * 8 + g
                                        j = j32 * 32 + w * 8 + 2 * t + e
                                        byte = (words[w] >> (8 * (half * 2 + e))) & 0xFF
                                        if i < seqlen_q and j < seqlen_k:
                                            mask[b][h][i][j] = int(byte <= threshold)
    return mask


# Known-answer tests of Random123 (kat_vectors, philox4x32 with 10 rounds): (counter, key, out).
KNOWN_ANSWERS = (
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
)


def self_check() -> None:
    """Raise AssertionError unless philox4x32_10 reproduces the known answers."""
    for counter, key, expected in KNOWN_ANSWERS:
        got = philox4x32_10(counter, key)
        assert got == expected, f"philox4x32_10({counter}, {key}) = {got}, expected {expected}"
