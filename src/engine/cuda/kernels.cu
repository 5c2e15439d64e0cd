// The CUDA backend's own kernels (everything cuDNN and cuBLAS do not do for us), compiled at
// run time with NVRTC. Activations are NHWC, so a tensor is a row-major [rows, c] matrix and
// per-channel work is a column operation. Every reduction runs in a fixed order (per-block
// partials in f64, then a sequential sum over blocks), so results are deterministic.

typedef long long i64;
#define INFINITY __int_as_float(0x7f800000)

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)blockDim.x * gridDim.x)

extern "C" __global__ void fill_f32(float* p, i64 n, float v) {
    GRID_STRIDE(i, n) p[i] = v;
}

extern "C" __global__ void add_assign_f32(const float* src, float* dst, i64 n) {
    GRID_STRIDE(i, n) dst[i] += src[i];
}

extern "C" __global__ void scale_f32(const float* x, float alpha, i64 n, float* y) {
    GRID_STRIDE(i, n) y[i] = alpha * x[i];
}

// torch.lerp_'s two forms, exact at both ends.
extern "C" __global__ void lerp_f32(const float* end, float w, i64 n, float* x) {
    GRID_STRIDE(i, n) x[i] = w < 0.5f ? __fadd_rn(x[i], __fmul_rn(w, __fsub_rn(end[i], x[i])))
                                      : __fsub_rn(end[i], __fmul_rn(__fsub_rn(end[i], x[i]), __fsub_rn(1.0f, w)));
}

// ---- data -------------------------------------------------------------------------------------

// One batch from the dataset's bytes ([n, 3, side, side] u8) kept on the GPU: for each image of
// the plan ([index, top, left, flip]), the side x side crop at (top, left) of the image padded by
// `pad` (padding reads as 0, or with `reflect` mirrors the image without repeating its edge),
// mirrored when flip, normalised, written NHWC. Same arithmetic as the host's write_image.
__device__ int reflect_index(int i, int side) { return i < 0 ? -i : (i > side - 1 ? 2 * (side - 1) - i : i); }

extern "C" __global__ void augment(const unsigned char* pixels, const unsigned int* items, int n, int side,
                                   int pad, int reflect, float m0, float m1, float m2, float s0, float s1, float s2, float* x) {
    i64 plane = (i64)side * side;
    GRID_STRIDE(i, (i64)n * plane * 3) {
        int c = (int)(i % 3);
        i64 q = i / 3;
        int ox = (int)(q % side), y = (int)(q / side % side), k = (int)(q / plane);
        const unsigned int* it = items + 4 * k;
        int xx = it[3] ? side - 1 - ox : ox;
        int sy = y + (int)it[1] - pad, sx = xx + (int)it[2] - pad;
        if (reflect) {
            sy = reflect_index(sy, side);
            sx = reflect_index(sx, side);
        }
        unsigned int v = 0;
        if (sy >= 0 && sy < side && sx >= 0 && sx < side) v = pixels[(i64)it[0] * 3 * plane + c * plane + (i64)sy * side + sx];
        float mean = c == 0 ? m0 : (c == 1 ? m1 : m2);
        float std = c == 0 ? s0 : (c == 1 ? s1 : s2);
        x[i] = __fdiv_rn(__fsub_rn(__fdiv_rn((float)v, 255.0f), mean), std);
    }
}

// ---- batch norm ------------------------------------------------------------------------------
// Column reductions use blocks of 32 channels x 8 row lanes; blockIdx.y picks a slice of rows.
// partial[blockIdx.y * c + ch] holds the slice's sum in f64.

#define BN_TX 32
#define BN_TY 8

__device__ void bn_block_reduce(double v, double* partial, int c, int ch) {
    __shared__ double s[BN_TY][BN_TX + 1];
    s[threadIdx.y][threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
        double t = 0.0;
        for (int k = 0; k < BN_TY; k++) t += s[k][threadIdx.x];
        partial[(i64)blockIdx.y * c + ch] = t;
    }
}

// Sum of x (center == 0) or of (x - center)^2 per channel.
extern "C" __global__ void bn_partial_sums(const float* x, i64 rows, int c, const float* center, double* partial) {
    int ch = blockIdx.x * BN_TX + threadIdx.x;
    double acc = 0.0;
    if (ch < c) {
        float m = center ? center[ch] : 0.0f;
        for (i64 r = (i64)blockIdx.y * BN_TY + threadIdx.y; r < rows; r += (i64)gridDim.y * BN_TY) {
            float v = x[r * c + ch];
            if (center) {
                float d = v - m;
                acc += (double)(d * d);
            } else {
                acc += (double)v;
            }
        }
    }
    bn_block_reduce(acc, partial, c, ch);
}

// saved = [mean | invstd]; running statistics as PyTorch updates them (unbiased variance).
extern "C" __global__ void bn_var(const double* partial, int parts, i64 rows, int c, float eps, float momentum,
                                  float* saved, float* running_mean, float* running_var) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double sq = 0.0;
    for (int p = 0; p < parts; p++) sq += partial[(i64)p * c + ch];
    double n = (double)rows;
    double var = sq / n;
    saved[c + ch] = (float)(1.0 / sqrt(var + (double)eps));
    double unbiased = rows > 1 ? sq / (n - 1.0) : var;
    running_mean[ch] = (1.0f - momentum) * running_mean[ch] + momentum * saved[ch];
    running_var[ch] = (1.0f - momentum) * running_var[ch] + momentum * (float)unbiased;
}

// y = relu?((x - mean) * scale + beta + residual?). Training: scale = gamma * invstd from saved;
// eval: scale = gamma / sqrt(running_var + eps).
extern "C" __global__ void bn_apply(const float* x, i64 rows, int c, const float* mean, const float* stat, int eval,
                                    float eps, const float* gamma, const float* beta, const float* residual, int relu,
                                    float* y) {
    GRID_STRIDE(i, rows * c) {
        int ch = (int)(i % c);
        float scale = eval ? gamma[ch] / sqrtf(stat[ch] + eps) : gamma[ch] * stat[ch];
        float v = (x[i] - mean[ch]) * scale + beta[ch];
        if (residual) v += residual[i];
        if (relu && v <= 0.0f) v = 0.0f;  // NaN stays NaN, as PyTorch's ReLU
        y[i] = v;
    }
}

// Backward pass 1: mask dy by the fused ReLU's output (in place), sum dy and dy * xhat.
extern "C" __global__ void bn_backward_sums(const float* x, float* dy, const float* relu_out, i64 rows, int c,
                                            const float* saved, double* partial_sum, double* partial_dot) {
    int ch = blockIdx.x * BN_TX + threadIdx.x;
    double sum = 0.0, dot = 0.0;
    if (ch < c) {
        float m = saved[ch], invstd = saved[c + ch];
        for (i64 r = (i64)blockIdx.y * BN_TY + threadIdx.y; r < rows; r += (i64)gridDim.y * BN_TY) {
            i64 i = r * c + ch;
            float d = dy[i];
            if (relu_out) {
                d = relu_out[i] <= 0.0f ? 0.0f : d;
                dy[i] = d;
            }
            sum += (double)d;
            dot += (double)(d * (x[i] - m) * invstd);
        }
    }
    bn_block_reduce(sum, partial_sum, c, ch);
    __syncthreads();
    bn_block_reduce(dot, partial_dot, c, ch);
}

extern "C" __global__ void bn_backward_finalize(const double* partial_sum, const double* partial_dot, int parts, int c,
                                                float* dgamma, float* dbeta) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double s = 0.0, d = 0.0;
    for (int p = 0; p < parts; p++) {
        s += partial_sum[(i64)p * c + ch];
        d += partial_dot[(i64)p * c + ch];
    }
    dbeta[ch] = (float)s;
    dgamma[ch] = (float)d;
}

// dx = gamma * invstd * (dy - dbeta / n - xhat * dgamma / n).
// n: the rows of the whole batch (more than `rows` when the ranks' statistics are synchronised),
// with dgamma and dbeta summed over the same rows.
extern "C" __global__ void bn_backward_dx(const float* x, const float* dy, i64 rows, int c, double count,
                                          const float* saved, const float* gamma, const float* dgamma,
                                          const float* dbeta, float* dx) {
    float n = (float)count;
    GRID_STRIDE(i, rows * c) {
        int ch = (int)(i % c);
        float invstd = saved[c + ch];
        float xhat = (x[i] - saved[ch]) * invstd;
        dx[i] = gamma[ch] * invstd * (dy[i] - dbeta[ch] / n - xhat * (dgamma[ch] / n));
    }
}

// Column sums of partials (bn_partial_sums with center == 0) divided by `divisor`, as f32:
// a batch norm's mean (divisor: rows) or a bias gradient (divisor 1, exact).
extern "C" __global__ void partial_column_sums(const double* partial, int parts, int c, double divisor, float* out) {
    int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    double t = 0.0;
    for (int p = 0; p < parts; p++) t += partial[(i64)p * c + ch];
    out[ch] = (float)(t / divisor);
}

extern "C" __global__ void bias_add(const float* bias, i64 rows, int c, float* y) {
    GRID_STRIDE(i, rows * c) y[i] += bias[i % c];
}

extern "C" __global__ void relu_forward(const float* x, i64 n, float* y) {
    GRID_STRIDE(i, n) y[i] = x[i] <= 0.0f ? 0.0f : x[i];  // NaN stays NaN, as PyTorch's ReLU
}

extern "C" __global__ void relu_backward(const float* y, const float* dy, i64 n, float* dx) {
    GRID_STRIDE(i, n) dx[i] = y[i] <= 0.0f ? 0.0f : dy[i];
}

// PyTorch's GELU, exact (erf) form, and its gradient from the forward input.
extern "C" __global__ void gelu_forward(const float* x, i64 n, float* y) {
    // erfc(-x / sqrt 2) / 2 is Phi(x) without 1 + erf's cancellation for negative x.
    GRID_STRIDE(i, n) y[i] = 0.5f * x[i] * erfcf(-x[i] * 0.70710678118654752f);
}

extern "C" __global__ void gelu_backward(const float* x, const float* dy, i64 n, float* dx) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        float cdf = 0.5f * erfcf(-v * 0.70710678118654752f);
        float pdf = 0.39894228040143268f * expf(-0.5f * v * v);
        dx[i] = dy[i] * (cdf + v * pdf);
    }
}

// ---- pooling ---------------------------------------------------------------------------------

struct PoolDims {
    int n, h, w, c, oh, ow, k, stride, pad;
};

extern "C" __global__ void max_pool_forward(const float* x, PoolDims d, float* y) {
    GRID_STRIDE(i, (i64)d.n * d.oh * d.ow * d.c) {
        int ch = (int)(i % d.c);
        i64 q = i / d.c;
        int ox = (int)(q % d.ow), oy = (int)(q / d.ow % d.oh), img = (int)(q / ((i64)d.ow * d.oh));
        float m = -INFINITY;
        for (int ky = 0; ky < d.k; ky++) {
            int iy = oy * d.stride + ky - d.pad;
            if (iy < 0 || iy >= d.h) continue;
            for (int kx = 0; kx < d.k; kx++) {
                int ix = ox * d.stride + kx - d.pad;
                if (ix < 0 || ix >= d.w) continue;
                float v = x[(((i64)img * d.h + iy) * d.w + ix) * d.c + ch];
                if (v > m || isnan(v)) m = v;
            }
        }
        y[i] = m;
    }
}

// One thread per input element gathers from the windows that contain it: it takes a window's
// gradient when it is that window's first maximum (PyTorch's choice). No atomics, so the sum
// order is fixed.
extern "C" __global__ void max_pool_backward(const float* x, const float* y, const float* dy, PoolDims d, float* dx) {
    GRID_STRIDE(i, (i64)d.n * d.h * d.w * d.c) {
        int ch = (int)(i % d.c);
        i64 q = i / d.c;
        int ix = (int)(q % d.w), iy = (int)(q / d.w % d.h), img = (int)(q / ((i64)d.w * d.h));
        float acc = 0.0f;
        int oy0 = max(0, (iy + d.pad - d.k + d.stride) / d.stride), oy1 = min(d.oh - 1, (iy + d.pad) / d.stride);
        int ox0 = max(0, (ix + d.pad - d.k + d.stride) / d.stride), ox1 = min(d.ow - 1, (ix + d.pad) / d.stride);
        for (int oy = oy0; oy <= oy1; oy++) {
            for (int ox = ox0; ox <= ox1; ox++) {
                i64 o = (((i64)img * d.oh + oy) * d.ow + ox) * d.c + ch;
                float ym = y[o];
                int found = 0, wy = -1, wx = -1;
                for (int ky = 0; ky < d.k && !found; ky++) {
                    int ty = oy * d.stride + ky - d.pad;
                    if (ty < 0 || ty >= d.h) continue;
                    for (int kx = 0; kx < d.k; kx++) {
                        int tx = ox * d.stride + kx - d.pad;
                        if (tx < 0 || tx >= d.w) continue;
                        float v = x[(((i64)img * d.h + ty) * d.w + tx) * d.c + ch];
                        if (v == ym || (isnan(v) && isnan(ym))) {
                            found = 1;
                            wy = ty;
                            wx = tx;
                            break;
                        }
                    }
                }
                if (wy == iy && wx == ix) acc += dy[o];
            }
        }
        dx[i] = acc;
    }
}

extern "C" __global__ void global_avg_pool_forward(const float* x, int n, int hw, int c, float* y) {
    GRID_STRIDE(i, (i64)n * c) {
        i64 img = i / c;
        int ch = (int)(i % c);
        float acc = 0.0f;
        for (int p = 0; p < hw; p++) acc += x[(img * hw + p) * c + ch];
        y[i] = acc * (1.0f / (float)hw);
    }
}

extern "C" __global__ void global_avg_pool_backward(const float* dy, int n, int hw, int c, float* dx) {
    GRID_STRIDE(i, (i64)n * hw * c) {
        int ch = (int)(i % c);
        i64 img = i / ((i64)hw * c);
        dx[i] = dy[img * c + ch] * (1.0f / (float)hw);
    }
}

// ---- linear, loss ----------------------------------------------------------------------------

// Each row of y[n, d] = b.
extern "C" __global__ void broadcast_rows(const float* b, int n, int d, float* y) {
    GRID_STRIDE(i, (i64)n * d) y[i] = b[i % d];
}

// db[j] = sum over rows of dy[:, j].
extern "C" __global__ void column_sums(const float* dy, int n, int d, float* db) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = 0.0f;
    for (int r = 0; r < n; r++) acc += dy[(i64)r * d + j];
    db[j] = acc;
}

// Mean softmax cross-entropy; one block, so the final sum has a fixed order.
#define CE_THREADS 256
extern "C" __global__ void cross_entropy(const float* logits, const int* labels, int n, int classes, float smoothing,
                                         float* loss, float* dlogits) {
    double s = (double)smoothing, off = s / (double)classes;
    __shared__ double part[CE_THREADS];
    double total = 0.0;
    for (int r = threadIdx.x; r < n; r += CE_THREADS) {
        const float* z = logits + (i64)r * classes;
        float* d = dlogits + (i64)r * classes;
        float m = -INFINITY;
        for (int k = 0; k < classes; k++) m = fmaxf(m, z[k]);
        double sum = 0.0, zsum = 0.0;
        for (int k = 0; k < classes; k++) {
            sum += exp((double)(z[k] - m));
            zsum += (double)z[k];
        }
        int label = labels[r];
        double lse = log(sum) + (double)m;
        total += (1.0 - s) * (lse - (double)z[label]) + s * (lse - zsum / (double)classes);
        double scale = 1.0 / (sum * (double)n);
        for (int k = 0; k < classes; k++) d[k] = (float)(exp((double)(z[k] - m)) * scale - off / (double)n);
        d[label] -= (float)((1.0 - s) / (double)n);
    }
    part[threadIdx.x] = total;
    __syncthreads();
    for (int s = CE_THREADS / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = (float)(part[0] / (double)n);
}

extern "C" __global__ void watch_loss(const float* loss, float step, float* watch) {
    if (!isfinite(loss[0]) && watch[0] == 0.0f) {
        watch[0] = step;
        watch[1] = loss[0];
    }
}

// ---- optimizers (PyTorch's single-tensor formulas, f32 constants derived on the host) ------------

struct AdamConsts {
    float step_size, bc2_sqrt, one_minus_b1, b2, one_minus_b2, eps, wd;
};

extern "C" __global__ void adam_step(float* p, const float* g, float* m, float* v, i64 n, AdamConsts k) {
    GRID_STRIDE(i, n) {
        float grad = g[i];
        if (k.wd != 0.0f) grad += k.wd * p[i];
        float mi = m[i] + k.one_minus_b1 * (grad - m[i]);
        float vi = v[i] * k.b2 + k.one_minus_b2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / k.bc2_sqrt + k.eps;
        p[i] -= k.step_size * (mi / denom);
    }
}

struct SgdConsts {
    float lr, momentum, one_minus_dampening, wd;
    int nesterov, first;
};

extern "C" __global__ void sgd_step(float* p, const float* g, float* buf, i64 n, SgdConsts k) {
    GRID_STRIDE(i, n) {
        float d = g[i];
        if (k.wd != 0.0f) d += k.wd * p[i];
        if (k.momentum != 0.0f) {
            float b = k.first ? d : k.momentum * buf[i] + k.one_minus_dampening * d;
            buf[i] = b;
            d = k.nesterov ? d + k.momentum * b : b;
        }
        p[i] -= k.lr * d;
    }
}
