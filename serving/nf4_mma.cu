// NF4 x bf16 product for up to 8 rows on the tensor cores (mma.sync m16n8k16): y[M, N] = x[M, K] @ W[N, K]^T.
//
// W is bitsandbytes' layout, read as it is: (N, K/2) bytes, the even k in a byte's high nibble, one fp32
// absmax per 64 values. The weight is the mma's 16-row A operand and the rows of x its 8-column B operand,
// so one weight tile serves all 8 rows. Per block of 64 k, a lane loads 8 bytes (16 consecutive k) of its
// output rows g and g + 8, and 16 values of x row g; those fill its A and B slots of four k16 tiles. A dot
// product does not care in which order k is summed as long as x follows the same order, and lane q's slots
// are the same in A and B: no shuffles, no staging through shared memory.
// A 16 x 16 tile then spans one absmax block per row, so the tiles multiply the bare code values and the
// block's sum is scaled once (acc += absmax * sum): decoding is one shared-memory read per byte, from a
// 256-entry table (a byte's two code values as bf16x2) repeated for the 32 lanes so reads never conflict.
// The code values are rounded to bf16 (at most 2^-9 relative); bitsandbytes rounds code * absmax instead.
// TILES (16-row tiles per warp), SPLIT (warps per block, splitting K) and UNROLL (64-k blocks per load
// round) come in as -D options.

struct alignas(16) Words4 { unsigned a, b, c, d; };
struct alignas(8) Words2 { unsigned a, b; };

__device__ __forceinline__ unsigned pick(const Words4& w, int i) {
    return i == 0 ? w.a : i == 1 ? w.b : i == 2 ? w.c : w.d;
}

extern "C" __global__ void __launch_bounds__(SPLIT * 32)
nf4_small_m(const unsigned short* __restrict__ x, const unsigned char* __restrict__ w,
            const float* __restrict__ absmax, const unsigned* __restrict__ byte_table,
            unsigned short* __restrict__ y, int M, int N, int K) {
    __shared__ unsigned table[256 * 32];  // table[byte * 32 + lane]: byte_table (nf4_byte_table) repeated
    __shared__ float partial[SPLIT][TILES * 16][8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int i = threadIdx.x; i < 256 * 8; i += blockDim.x) {  // 4 entries per 16-byte store
        const unsigned v = byte_table[i >> 3];
        reinterpret_cast<Words4*>(table)[i] = Words4{v, v, v, v};
    }
    __syncthreads();

    const int g = lane >> 2, q = lane & 3;
    const int row0 = blockIdx.x * TILES * 16;
    const int blocks = K >> 6;  // 64 k per absmax block: 4 lanes x 16
    const int begin = warp * blocks / SPLIT, end = (warp + 1) * blocks / SPLIT;
    const long row_bytes = K >> 1;

    const unsigned char* wp[TILES][2];
    const float* sp[TILES][2];
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int r = row0 + t * 16 + h * 8 + g;
            r = r < N ? r : N - 1;  // rows past N compute what is never stored
            wp[t][h] = w + r * row_bytes + q * 8;
            sp[t][h] = absmax + (long)r * blocks;
        }
    const bool has_x = g < M;
    const unsigned short* xp = x + (long)(has_x ? g : 0) * K + q * 16;
    const unsigned* tl = table + lane;

    float acc[TILES][4];
#pragma unroll
    for (int t = 0; t < TILES; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

    Words2 wv[UNROLL][TILES][2];
    float sv[UNROLL][TILES][2];
    Words4 xv[UNROLL][2];
    auto load = [&](int b0, Words2 (&wn)[UNROLL][TILES][2], float (&sn)[UNROLL][TILES][2], Words4 (&xn)[UNROLL][2]) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int b = b0 + u < end ? b0 + u : end - 1;  // a short last round reloads; its sums are skipped
#pragma unroll
            for (int t = 0; t < TILES; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    wn[u][t][h] = *reinterpret_cast<const Words2*>(wp[t][h] + (long)b * 32);
                    sn[u][t][h] = sp[t][h][b];
                }
#pragma unroll
            for (int i = 0; i < 2; ++i)
                xn[u][i] = has_x ? *reinterpret_cast<const Words4*>(xp + (long)b * 64 + i * 8) : Words4{0, 0, 0, 0};
        }
    };
    if (begin < end) load(begin, wv, sv, xv);
    for (int b0 = begin; b0 < end; b0 += UNROLL) {
        Words2 wn[UNROLL][TILES][2];
        float sn[UNROLL][TILES][2];
        Words4 xn[UNROLL][2];
        const bool more = b0 + UNROLL < end;
        if (more) load(b0 + UNROLL, wn, sn, xn);  // the next round's loads fly while this one computes
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (b0 + u >= end) break;
#pragma unroll
            for (int t = 0; t < TILES; ++t) {
                float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < 4; ++j) {  // k16 tile j: bytes 2j, 2j+1 of the lane's 8; x words 2j, 2j+1
                    const unsigned b0w = pick(xv[u][j >> 1], (2 * j) & 3), b1w = pick(xv[u][j >> 1], (2 * j + 1) & 3);
                    const unsigned lo = (j >> 1) ? wv[u][t][0].b : wv[u][t][0].a;
                    const unsigned hi = (j >> 1) ? wv[u][t][1].b : wv[u][t][1].a;
                    const int shift = 16 * (j & 1);
                    const unsigned a0 = tl[((lo >> shift) & 255) * 32];
                    const unsigned a1 = tl[((hi >> shift) & 255) * 32];
                    const unsigned a2 = tl[((lo >> (shift + 8)) & 255) * 32];
                    const unsigned a3 = tl[((hi >> (shift + 8)) & 255) * 32];
                    asm volatile(
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0w), "r"(b1w));
                }
                // d0, d1: output row g (batch rows 2q, 2q + 1); d2, d3: output row g + 8
                acc[t][0] += sv[u][t][0] * d[0];
                acc[t][1] += sv[u][t][0] * d[1];
                acc[t][2] += sv[u][t][1] * d[2];
                acc[t][3] += sv[u][t][1] * d[3];
            }
        }
        if (more) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
                for (int t = 0; t < TILES; ++t)
#pragma unroll
                    for (int h = 0; h < 2; ++h) { wv[u][t][h] = wn[u][t][h]; sv[u][t][h] = sn[u][t][h]; }
                xv[u][0] = xn[u][0];
                xv[u][1] = xn[u][1];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
        partial[warp][t * 16 + g][2 * q] = acc[t][0];
        partial[warp][t * 16 + g][2 * q + 1] = acc[t][1];
        partial[warp][t * 16 + g + 8][2 * q] = acc[t][2];
        partial[warp][t * 16 + g + 8][2 * q + 1] = acc[t][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < TILES * 16 * 8; i += blockDim.x) {
        const int n = i >> 3, m = i & 7, row = row0 + n;
        if (m >= M || row >= N) continue;
        float sum = 0.f;
#pragma unroll
        for (int s = 0; s < SPLIT; ++s) sum += partial[s][n][m];
        unsigned short out;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(sum));
        y[(long)m * N + row] = out;
    }
}
