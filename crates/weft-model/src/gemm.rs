//! Matrix products of the trainer, `C = start + A·B`, with one summation order per output.
//!
//! Every output element is its `start` followed by one fused multiply-add per `k`, in increasing
//! `k`: `acc = fma(a[m, k], b[k, j], acc)`. Blocking, threads and vector width only decide which
//! outputs are computed together, never the order within one. A fused multiply-add is exactly
//! rounded whether the CPU computes it or `f32::mul_add` does in software, so the AVX-512, AVX2
//! and portable builds give the same bits, on any thread count (tested below).
//!
//! The AVX2 build is a register-blocked micro-kernel in the style of BLIS: a tile of 6 rows ×
//! 16 columns lives in twelve vector registers while `k` runs, so each step loads two vectors
//! of `B` and six scalars of `A` for twelve fused multiply-adds. The AVX-512 build does the same
//! with 12 rows × 32 columns (24 registers of 16 lanes), where the CPU has it.

use rayon::prelude::*;
#[cfg(target_arch = "x86_64")]
use weft_core::cpu::{wide_vectors, widest_vectors};

/// The left operand: element `(m, k)` is `data[m * row_stride + k * k_stride]`, so a transposed
/// view (the weight gradient's `doutᵀ`) costs nothing.
#[derive(Clone, Copy)]
pub struct Lhs<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub k_stride: usize,
}

/// The right operand: element `(k, j)` is `data[k * k_stride + j * j_stride]`. Either its rows
/// are contiguous (`j_stride == 1`, the usual `B`) or its columns are (`k_stride == 1`, a
/// transposed view such as a weight stored `[out, in]` read as `Wᵀ`).
#[derive(Clone, Copy)]
struct Rhs<'a> {
    data: &'a [f32],
    k_stride: usize,
    j_stride: usize,
}

impl Rhs<'_> {
    fn is_transposed(&self) -> bool {
        self.j_stride != 1
    }
}

/// What each output starts from before the products are added.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    Zero,
    /// `bias[j]` for column `j`.
    Bias(&'a [f32]),
    /// The value already in `C` (gradients accumulate).
    Accumulate,
}

/// Fewest rows per parallel task (a multiple of the micro-kernels' six and twelve rows).
const ROWS_PER_TASK: usize = 24;
/// A right operand past this many bytes no longer stays in a core's cache between tasks.
const LARGE_RHS_BYTES: usize = 256 << 10;

/// `c[m, j] = start + Σ_k a[m, k] · b[k·ldb + j]` for the `cols`-column row-major matrix `c`.
///
/// Panics if an operand is shorter than its shape says (a bug in the caller, not bad input:
/// shapes come from a validated configuration).
pub fn gemm(c: &mut [f32], cols: usize, a: Lhs, b: &[f32], ldb: usize, depth: usize, start: Start) {
    parallel(c, cols, a, Rhs { data: b, k_stride: ldb, j_stride: 1 }, depth, start);
}

/// [`gemm`] with the right operand given transposed: `c[m, j] = start + Σ_k a[m, k] ·
/// bt[j·ldbt + k]`. A layer's forward product `x·Wᵀ` reads its weight, stored `[out, in]`, in
/// place, with the same summation order as `gemm` on a copy of `Wᵀ`.
pub fn gemm_transposed_rhs(c: &mut [f32], cols: usize, a: Lhs, bt: &[f32], ldbt: usize, depth: usize, start: Start) {
    parallel(c, cols, a, Rhs { data: bt, k_stride: 1, j_stride: ldbt }, depth, start);
}

fn parallel(c: &mut [f32], cols: usize, a: Lhs, b: Rhs, depth: usize, start: Start) {
    if cols == 0 || c.is_empty() {
        return;
    }
    assert_eq!(c.len() % cols, 0, "output is not a whole number of rows");
    let rows = c.len() / cols;
    check_operands(rows, cols, a, b, depth, start);
    if depth == 0 {
        return portable_block(c, cols, rows, cols, a, b, 0, start);
    }
    // Each task reads all of `B`: a `B` larger than a core's cache is split in as few tasks as
    // keep every thread busy; a small one in many, which balance better on a busy machine.
    let per_task = if depth * cols * 4 > LARGE_RHS_BYTES {
        rows.div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(12).max(ROWS_PER_TASK)
    } else {
        ROWS_PER_TASK
    };
    c.par_chunks_mut(per_task * cols).enumerate().for_each(|(task, block)| {
        let a = Lhs { data: &a.data[task * per_task * a.row_stride..], ..a };
        let rows = block.len() / cols;
        #[cfg(target_arch = "x86_64")]
        if widest_vectors() {
            // SAFETY: `widest_vectors` checked that this CPU has AVX-512F, AVX2 and FMA; the
            // operand lengths were checked above for every row, and `a` was advanced to this
            // block's first row.
            return unsafe { avx512::block(block, cols, rows, cols, a, b, depth, start) };
        }
        #[cfg(target_arch = "x86_64")]
        if wide_vectors() {
            // SAFETY: `wide_vectors` checked that this CPU has AVX2 and FMA; the rest as above.
            return unsafe { avx2::block(block, cols, rows, cols, a, b, depth, start) };
        }
        portable_block(block, cols, rows, cols, a, b, depth, start);
    });
}

/// [`gemm`] without threads of its own, for callers already inside a parallel loop (attention
/// runs one per sequence and head), on a `rows × cols` window of `c` whose rows are `ldc` apart.
#[allow(clippy::too_many_arguments)]
pub fn gemm_serial(
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
    a: Lhs,
    b: &[f32],
    ldb: usize,
    depth: usize,
    start: Start,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(ldc >= cols && c.len() >= (rows - 1) * ldc + cols, "output too short");
    let b = Rhs { data: b, k_stride: ldb, j_stride: 1 };
    check_operands(rows, cols, a, b, depth, start);
    #[cfg(target_arch = "x86_64")]
    if depth > 0 && widest_vectors() {
        // SAFETY: as in `gemm`; every row of the window was checked above.
        return unsafe { avx512::block(c, ldc, rows, cols, a, b, depth, start) };
    }
    #[cfg(target_arch = "x86_64")]
    if depth > 0 && wide_vectors() {
        // SAFETY: as in `gemm`; every row of the window was checked above.
        return unsafe { avx2::block(c, ldc, rows, cols, a, b, depth, start) };
    }
    portable_block(c, ldc, rows, cols, a, b, depth, start);
}

/// The bounds the wide blocks rely on, for `rows ≥ 1` rows and `cols ≥ 1` columns.
fn check_operands(rows: usize, cols: usize, a: Lhs, b: Rhs, depth: usize, start: Start) {
    if depth > 0 {
        assert!(a.data.len() > (rows - 1) * a.row_stride + (depth - 1) * a.k_stride, "left operand too short");
        let (along, across) = if b.is_transposed() { (b.j_stride, depth) } else { (b.k_stride, cols) };
        assert!((b.k_stride == 1 || b.j_stride == 1) && along >= across, "right operand's rows overlap");
        assert!(b.data.len() > (depth - 1) * b.k_stride + (cols - 1) * b.j_stride, "right operand too short");
    }
    if let Start::Bias(bias) = start {
        assert!(bias.len() >= cols, "bias too short");
    }
}

/// The definition of the product, row by row; the compiler vectorises the inner loop over `j`.
#[allow(clippy::too_many_arguments)]
fn portable_block(c: &mut [f32], ldc: usize, rows: usize, cols: usize, a: Lhs, b: Rhs, depth: usize, start: Start) {
    for m in 0..rows {
        let row = &mut c[m * ldc..][..cols];
        match start {
            Start::Zero => row.fill(0.0),
            Start::Bias(bias) => row.copy_from_slice(&bias[..cols]),
            Start::Accumulate => {}
        }
        for k in 0..depth {
            let av = a.data[m * a.row_stride + k * a.k_stride];
            let b_row = b.data[k * b.k_stride..].iter().step_by(b.j_stride);
            for (o, &bv) in row.iter_mut().zip(b_row) {
                *o = fused_mul_add(av, bv, *o);
            }
        }
    }
}

/// `a·b + c` rounded once: the CPU's fused multiply-add where the build target has one, else
/// [`fma_by_rounding_to_odd`] (a libm `fmaf` call per element measured ~40× slower than AVX2).
#[inline(always)]
fn fused_mul_add(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(any(target_feature = "fma", target_arch = "aarch64"))]
    return a.mul_add(b, c);
    #[cfg(not(any(target_feature = "fma", target_arch = "aarch64")))]
    fma_by_rounding_to_odd(a, b, c)
}

/// A correctly rounded `a·b + c` from f64 arithmetic (Boldo & Melquiond's rounding to odd): the
/// product of two f32 is exact in f64; TwoSum gives the error of the f64 sum; an inexact sum with
/// its last bit forced to 1 then rounds to the same f32 as the exact value. Branch-free, so it
/// vectorises.
#[cfg_attr(any(target_feature = "fma", target_arch = "aarch64"), allow(dead_code))]
#[inline(always)]
fn fma_by_rounding_to_odd(a: f32, b: f32, c: f32) -> f32 {
    let product = f64::from(a) * f64::from(b);
    let addend = f64::from(c);
    let sum = product + addend;
    let virtual_addend = sum - product;
    let error = (product - (sum - virtual_addend)) + (addend - virtual_addend);
    let bits = sum.to_bits();
    let inexact_even = error != 0.0 && sum.is_finite() && bits & 1 == 0;
    // One ulp toward the exact value: up in magnitude if the error has the sum's sign.
    let step = if (error > 0.0) == (sum > 0.0) { 1u64 } else { u64::MAX };
    f64::from_bits(bits.wrapping_add(if inexact_even { step } else { 0 })) as f32
}

/// How a wide build's tile accumulators begin: a later depth pass resumes from what the previous
/// one stored, which keeps each output's order of operations unchanged.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Init {
    Zero,
    Bias(*const f32),
    Load,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Init, Lhs, Rhs, Start};
    use std::arch::x86_64::*;

    const MR: usize = 6;
    /// Depth per pass: a 16-column panel of `B` (16 KB) stays in L1 while the rows go by.
    const KC: usize = 256;

    /// Pointers and strides of one tile; `a`, `b`, `c` point at its first row / depth / column.
    #[derive(Clone, Copy)]
    struct Tile {
        a: *const f32,
        a_rs: usize,
        a_ks: usize,
        b: *const f32,
        b_ks: usize,
        b_js: usize,
        c: *mut f32,
        ldc: usize,
        depth: usize,
        init: Init,
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `c` covers `rows` rows `ldc` apart, and `a`, `b` and `start`'s
    /// bias cover `rows`, `depth` and `cols` (checked by [`super::gemm`] and
    /// [`super::gemm_serial`]).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block(
        c: &mut [f32],
        ldc: usize,
        rows: usize,
        cols: usize,
        a: Lhs,
        b: Rhs,
        depth: usize,
        start: Start,
    ) {
        if depth == 0 {
            return super::portable_block(c, ldc, rows, cols, a, b, 0, start);
        }
        // The panel of `B` the row tiles share, packed contiguously when `B` is large: rows of
        // `B` a multiple of 4 KB apart (a 49152-column head, a 1536-column MLP) would all fall
        // into one L1 set. A small `B` stays in cache as it is, and copying it would only cost.
        // A transposed `B` is always packed: its columns are what lie contiguously.
        let pack = b.is_transposed() || (rows > MR && depth * cols * 4 > super::LARGE_RHS_BYTES);
        // Allocated only when packing: small products (attention's, per head) run often.
        let mut panel = if pack { vec![0.0f32; KC * 16] } else { Vec::new() };
        let mut k0 = 0;
        while k0 < depth {
            let kc = KC.min(depth - k0);
            let mut j = 0;
            while j < cols {
                let width = if cols - j >= 16 {
                    16
                } else if cols - j >= 8 {
                    8
                } else {
                    cols - j
                };
                let init = match (k0, start) {
                    (0, Start::Zero) => Init::Zero,
                    (0, Start::Bias(bias)) => Init::Bias(bias.as_ptr().add(j)),
                    _ => Init::Load,
                };
                // Packing moves values, never changes which are multiplied or in what order.
                let origin = b.data.as_ptr().add(k0 * b.k_stride + j * b.j_stride);
                let (panel_b, panel_ks, panel_js) = if pack && width >= 8 {
                    if b.is_transposed() {
                        pack_transposed(panel.as_mut_ptr(), origin, b.j_stride, kc, width);
                    } else {
                        pack_rows(panel.as_mut_ptr(), origin, b.k_stride, kc, width);
                    }
                    (panel.as_ptr(), width, 1)
                } else {
                    (origin, b.k_stride, b.j_stride)
                };
                let mut m = 0;
                while m < rows {
                    let mr = MR.min(rows - m);
                    let tile = Tile {
                        a: a.data.as_ptr().add(m * a.row_stride + k0 * a.k_stride),
                        a_rs: a.row_stride,
                        a_ks: a.k_stride,
                        b: panel_b,
                        b_ks: panel_ks,
                        b_js: panel_js,
                        c: c.as_mut_ptr().add(m * ldc + j),
                        ldc,
                        depth: kc,
                        init,
                    };
                    match (width, mr) {
                        (16, 6) => vector_tile::<6, 2>(tile),
                        (16, 5) => vector_tile::<5, 2>(tile),
                        (16, 4) => vector_tile::<4, 2>(tile),
                        (16, 3) => vector_tile::<3, 2>(tile),
                        (16, 2) => vector_tile::<2, 2>(tile),
                        (16, _) => vector_tile::<1, 2>(tile),
                        (8, 6) => vector_tile::<6, 1>(tile),
                        (8, 5) => vector_tile::<5, 1>(tile),
                        (8, 4) => vector_tile::<4, 1>(tile),
                        (8, 3) => vector_tile::<3, 1>(tile),
                        (8, 2) => vector_tile::<2, 1>(tile),
                        (8, _) => vector_tile::<1, 1>(tile),
                        _ => scalar_tile(tile, mr, width),
                    }
                    m += mr;
                }
                j += width;
            }
            k0 += kc;
        }
    }

    /// Copies `kc` rows of `width` (8 or 16) columns, `ldb` apart, to `panel` `width` apart.
    #[inline(always)]
    unsafe fn pack_rows(panel: *mut f32, b: *const f32, ldb: usize, kc: usize, width: usize) {
        for k in 0..kc {
            for v in (0..width).step_by(8) {
                _mm256_storeu_ps(panel.add(k * width + v), _mm256_loadu_ps(b.add(k * ldb + v)));
            }
        }
    }

    /// The panel of a transposed `B`: column `jj` of the panel (`width` apart) is `kc`
    /// contiguous values at `bt + jj·ldbt`. Blocks of 8 × 8 are transposed in registers, the
    /// columns past the last whole eight one value at a time.
    #[inline(always)]
    pub(super) unsafe fn pack_transposed(panel: *mut f32, bt: *const f32, ldbt: usize, kc: usize, width: usize) {
        let whole = width / 8 * 8;
        for j0 in (0..whole).step_by(8) {
            let mut k = 0;
            while k + 8 <= kc {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(bt.add((j0 + i) * ldbt + k)));
                for (i, column) in transpose8(r).into_iter().enumerate() {
                    _mm256_storeu_ps(panel.add((k + i) * width + j0), column);
                }
                k += 8;
            }
            for k in k..kc {
                for i in 0..8 {
                    *panel.add(k * width + j0 + i) = *bt.add((j0 + i) * ldbt + k);
                }
            }
        }
        for jj in whole..width {
            for k in 0..kc {
                *panel.add(k * width + jj) = *bt.add(jj * ldbt + k);
            }
        }
    }

    /// Row `i` of the result is lane `i` of every input.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }

    /// `R` rows × `V` vectors of eight columns, accumulated in registers across the depth;
    /// `B`'s rows are contiguous (`b_js == 1`).
    #[inline(always)]
    unsafe fn vector_tile<const R: usize, const V: usize>(t: Tile) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, lane) in row.iter_mut().enumerate() {
                *lane = match t.init {
                    Init::Zero => _mm256_setzero_ps(),
                    Init::Bias(bias) => _mm256_loadu_ps(bias.add(8 * v)),
                    Init::Load => _mm256_loadu_ps(t.c.add(r * t.ldc + 8 * v)),
                };
            }
        }
        for k in 0..t.depth {
            let bk = t.b.add(k * t.b_ks);
            let mut bv = [_mm256_setzero_ps(); V];
            for (v, lane) in bv.iter_mut().enumerate() {
                *lane = _mm256_loadu_ps(bk.add(8 * v));
            }
            let ak = t.a.add(k * t.a_ks);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*ak.add(r * t.a_rs));
                for (lane, &bl) in row.iter_mut().zip(&bv) {
                    *lane = _mm256_fmadd_ps(av, bl, *lane);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, lane) in row.iter().enumerate() {
                _mm256_storeu_ps(t.c.add(r * t.ldc + 8 * v), *lane);
            }
        }
    }

    /// The last columns of a matrix whose width is not a multiple of eight.
    #[inline(always)]
    unsafe fn scalar_tile(t: Tile, rows: usize, cols: usize) {
        for r in 0..rows {
            for j in 0..cols {
                let out = t.c.add(r * t.ldc + j);
                let mut acc = match t.init {
                    Init::Zero => 0.0,
                    Init::Bias(bias) => *bias.add(j),
                    Init::Load => *out,
                };
                for k in 0..t.depth {
                    acc = (*t.a.add(r * t.a_rs + k * t.a_ks)).mul_add(*t.b.add(k * t.b_ks + j * t.b_js), acc);
                }
                *out = acc;
            }
        }
    }
}

/// The AVX-512 build: a tile of up to 12 rows × 32 columns in 24 of the 32 vector registers; a
/// panel narrower than 32 columns masks its last vector, so no column is left to scalar code.
/// Same order of operations per output as every other build.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Init, Lhs, Rhs, Start};
    use std::arch::x86_64::*;

    const MR: usize = 12;
    const NR: usize = 32;
    /// Depth per pass: a 32-column panel of `B` (32 KB) and a row tile of `A` (12 KB) share L1.
    const KC: usize = 256;

    /// Pointers and strides of one tile; `a`, `b`, `c` point at its first row / depth / column.
    /// `B`'s rows are contiguous; `last` masks the columns of the tile's last vector.
    #[derive(Clone, Copy)]
    struct Tile {
        a: *const f32,
        a_rs: usize,
        a_ks: usize,
        b: *const f32,
        b_ks: usize,
        c: *mut f32,
        ldc: usize,
        depth: usize,
        init: Init,
        last: __mmask16,
    }

    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA; the operands cover the shapes as for
    /// [`super::avx2::block`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn block(
        c: &mut [f32],
        ldc: usize,
        rows: usize,
        cols: usize,
        a: Lhs,
        b: Rhs,
        depth: usize,
        start: Start,
    ) {
        if depth == 0 {
            return super::portable_block(c, ldc, rows, cols, a, b, 0, start);
        }
        // As in the AVX2 build: a large or transposed `B` is packed panel by panel.
        let pack = b.is_transposed() || (rows > MR && depth * cols * 4 > super::LARGE_RHS_BYTES);
        let mut panel = if pack { vec![0.0f32; KC * NR] } else { Vec::new() };
        let mut k0 = 0;
        while k0 < depth {
            let kc = KC.min(depth - k0);
            let mut j = 0;
            while j < cols {
                let width = NR.min(cols - j);
                let init = match (k0, start) {
                    (0, Start::Zero) => Init::Zero,
                    (0, Start::Bias(bias)) => Init::Bias(bias.as_ptr().add(j)),
                    _ => Init::Load,
                };
                let origin = b.data.as_ptr().add(k0 * b.k_stride + j * b.j_stride);
                let (panel_b, panel_ks) = if pack {
                    if b.is_transposed() {
                        super::avx2::pack_transposed(panel.as_mut_ptr(), origin, b.j_stride, kc, width);
                    } else {
                        pack_rows(panel.as_mut_ptr(), origin, b.k_stride, kc, width);
                    }
                    (panel.as_ptr(), width)
                } else {
                    (origin, b.k_stride)
                };
                let vectors = width.div_ceil(16);
                let tail = width - 16 * (vectors - 1);
                let last = if tail == 16 { u16::MAX } else { (1u16 << tail) - 1 };
                let mut m = 0;
                while m < rows {
                    // Twelve rows, then the rest in eights, fours, twos and ones.
                    let mr = [MR, 8, 4, 2, 1].into_iter().find(|&r| r <= rows - m).unwrap_or(1);
                    let tile = Tile {
                        a: a.data.as_ptr().add(m * a.row_stride + k0 * a.k_stride),
                        a_rs: a.row_stride,
                        a_ks: a.k_stride,
                        b: panel_b,
                        b_ks: panel_ks,
                        c: c.as_mut_ptr().add(m * ldc + j),
                        ldc,
                        depth: kc,
                        init,
                        last,
                    };
                    match (vectors, mr) {
                        (2, 12) => vector_tile::<12, 2>(tile),
                        (2, 8) => vector_tile::<8, 2>(tile),
                        (2, 4) => vector_tile::<4, 2>(tile),
                        (2, 2) => vector_tile::<2, 2>(tile),
                        (2, _) => vector_tile::<1, 2>(tile),
                        (_, 12) => vector_tile::<12, 1>(tile),
                        (_, 8) => vector_tile::<8, 1>(tile),
                        (_, 4) => vector_tile::<4, 1>(tile),
                        (_, 2) => vector_tile::<2, 1>(tile),
                        (_, _) => vector_tile::<1, 1>(tile),
                    }
                    m += mr;
                }
                j += width;
            }
            k0 += kc;
        }
    }

    /// Copies `kc` rows of `width` (≤ 32) columns, `ldb` apart, to `panel` `width` apart.
    #[inline(always)]
    unsafe fn pack_rows(panel: *mut f32, b: *const f32, ldb: usize, kc: usize, width: usize) {
        for k in 0..kc {
            let mut v = 0;
            while v < width {
                let lanes = (width - v).min(16);
                let mask = if lanes == 16 { u16::MAX } else { (1u16 << lanes) - 1 };
                let values = _mm512_maskz_loadu_ps(mask, b.add(k * ldb + v));
                _mm512_mask_storeu_ps(panel.add(k * width + v), mask, values);
                v += 16;
            }
        }
    }

    /// `R` rows × `V` vectors of sixteen columns (the last masked by `t.last`), accumulated in
    /// registers across the depth.
    #[inline(always)]
    unsafe fn vector_tile<const R: usize, const V: usize>(t: Tile) {
        let mask = |v: usize| if v + 1 == V { t.last } else { u16::MAX };
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (r, row) in acc.iter_mut().enumerate() {
            for (v, lane) in row.iter_mut().enumerate() {
                *lane = match t.init {
                    Init::Zero => _mm512_setzero_ps(),
                    Init::Bias(bias) => _mm512_maskz_loadu_ps(mask(v), bias.add(16 * v)),
                    Init::Load => _mm512_maskz_loadu_ps(mask(v), t.c.add(r * t.ldc + 16 * v)),
                };
            }
        }
        for k in 0..t.depth {
            let bk = t.b.add(k * t.b_ks);
            let mut bv = [_mm512_setzero_ps(); V];
            for (v, lane) in bv.iter_mut().enumerate() {
                *lane = _mm512_maskz_loadu_ps(mask(v), bk.add(16 * v));
            }
            let ak = t.a.add(k * t.a_ks);
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ak.add(r * t.a_rs));
                for (lane, &bl) in row.iter_mut().zip(&bv) {
                    *lane = _mm512_fmadd_ps(av, bl, *lane);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, lane) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(t.c.add(r * t.ldc + 16 * v), mask(v), *lane);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// The definition, one output at a time.
    fn reference(c: &mut [f32], cols: usize, a: Lhs, b: &[f32], ldb: usize, depth: usize, start: Start) {
        for (m, row) in c.chunks_exact_mut(cols).enumerate() {
            for (j, out) in row.iter_mut().enumerate() {
                let mut acc = match start {
                    Start::Zero => 0.0,
                    Start::Bias(bias) => bias[j],
                    Start::Accumulate => *out,
                };
                for k in 0..depth {
                    acc = a.data[m * a.row_stride + k * a.k_stride].mul_add(b[k * ldb + j], acc);
                }
                *out = acc;
            }
        }
    }

    #[test]
    fn every_build_gives_the_definitions_bits_on_ragged_shapes() {
        // Rows, columns and depths that leave remainders in every blocking dimension, including
        // a depth past one pass of the AVX2 kernel (256), packed panels of 16 and 8 columns, and
        // a right operand large enough to be split by rows per thread (61 × 300 × 260).
        let shapes = [
            (1, 1, 1),
            (7, 9, 3),
            (13, 23, 5),
            (25, 40, 300),
            (50, 17, 257),
            (6, 16, 0),
            (61, 300, 260),
            (30, 48, 9),
            (11, 64, 20),
            (37, 33, 70),
        ];
        for &(rows, cols, depth) in &shapes {
            for (s, transposed) in [(0u32, false), (1, true)] {
                let a_data = values(rows * depth + 1, 11 + s);
                let a = if transposed {
                    Lhs { data: &a_data, row_stride: 1, k_stride: rows }
                } else {
                    Lhs { data: &a_data, row_stride: depth, k_stride: 1 }
                };
                let ldb = cols + 3;
                let b = values(depth * ldb + 1, 12 + s);
                let bias = values(cols, 13 + s);
                for start in [Start::Zero, Start::Bias(&bias), Start::Accumulate] {
                    let initial = values(rows * cols, 14 + s);
                    let mut expected = initial.clone();
                    reference(&mut expected, cols, a, &b, ldb, depth, start);
                    let mut through_gemm = initial.clone();
                    gemm(&mut through_gemm, cols, a, &b, ldb, depth, start);
                    assert_eq!(bits(&through_gemm), bits(&expected), "gemm {rows}×{cols}×{depth}");
                    // The same `B` stored transposed, its columns `depth + 2` apart.
                    let ldbt = depth + 2;
                    let mut bt = vec![f32::NAN; cols * ldbt];
                    for k in 0..depth {
                        for j in 0..cols {
                            bt[j * ldbt + k] = b[k * ldb + j];
                        }
                    }
                    let mut through_transposed = initial.clone();
                    gemm_transposed_rhs(&mut through_transposed, cols, a, &bt, ldbt, depth, start);
                    assert_eq!(bits(&through_transposed), bits(&expected), "transposed {rows}×{cols}×{depth}");
                    let rhs = Rhs { data: &b, k_stride: ldb, j_stride: 1 };
                    let rhs_t = Rhs { data: &bt, k_stride: 1, j_stride: ldbt };
                    for (rhs, layout) in [(rhs, "rows"), (rhs_t, "columns")] {
                        let mut portable = initial.clone();
                        portable_block(&mut portable, cols, rows, cols, a, rhs, depth, start);
                        assert_eq!(bits(&portable), bits(&expected), "portable {rows}×{cols}×{depth} {layout}");
                        #[cfg(target_arch = "x86_64")]
                        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                            let mut wide = initial.clone();
                            // SAFETY: features checked; shapes as above.
                            unsafe { avx2::block(&mut wide, cols, rows, cols, a, rhs, depth, start) };
                            assert_eq!(bits(&wide), bits(&expected), "avx2 {rows}×{cols}×{depth} {layout}");
                            if std::arch::is_x86_feature_detected!("avx512f") {
                                let mut widest = initial.clone();
                                // SAFETY: features checked; shapes as above.
                                unsafe { avx512::block(&mut widest, cols, rows, cols, a, rhs, depth, start) };
                                assert_eq!(bits(&widest), bits(&expected), "avx512 {rows}×{cols}×{depth} {layout}");
                            }
                        }
                    }
                    // The same product as a window of a wider matrix: the columns outside it
                    // are left alone.
                    let ldc = cols + 5;
                    let mut wider: Vec<f32> = (0..rows * ldc).map(|i| i as f32).collect();
                    for m in 0..rows {
                        wider[m * ldc..][..cols].copy_from_slice(&initial[m * cols..][..cols]);
                    }
                    gemm_serial(&mut wider, ldc, rows, cols, a, &b, ldb, depth, start);
                    for m in 0..rows {
                        assert_eq!(bits(&wider[m * ldc..][..cols]), bits(&expected[m * cols..][..cols]));
                        let outside: Vec<f32> = (m * ldc + cols..(m + 1) * ldc).map(|i| i as f32).collect();
                        assert_eq!(bits(&wider[m * ldc + cols..(m + 1) * ldc]), bits(&outside));
                    }
                }
            }
        }
    }

    /// Against the C library's `fmaf` (or the CPU's): random finite triples, and sums that
    /// cancel, where a double rounding would show.
    #[test]
    fn rounding_to_odd_is_a_correctly_rounded_fma() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut checked = 0;
        while checked < 1_000_000 {
            let r = next();
            let (a, b) = (f32::from_bits(r as u32), f32::from_bits((r >> 32) as u32));
            let c = match next() % 3 {
                0 => f32::from_bits(next() as u32),
                // c ≈ −a·b: the exact result is the product's low bits.
                1 => -(a * b) * (1.0 + (next() % 7) as f32 * f32::EPSILON),
                _ => f32::from_bits((a * b).to_bits() ^ (next() as u32 & 0xff)),
            };
            if !(a.is_finite() && b.is_finite() && c.is_finite()) {
                continue;
            }
            let (want, got) = (a.mul_add(b, c), fma_by_rounding_to_odd(a, b, c));
            assert!(want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()), "fma({a:e}, {b:e}, {c:e})");
            checked += 1;
        }
    }

    #[test]
    fn products_are_right() {
        // [[1, 2], [3, 4]] · [[5, 6], [7, 8]] + bias [1, -1]
        let mut c = [0.0; 4];
        let a = Lhs { data: &[1.0, 2.0, 3.0, 4.0], row_stride: 2, k_stride: 1 };
        gemm(&mut c, 2, a, &[5.0, 6.0, 7.0, 8.0], 2, 2, Start::Bias(&[1.0, -1.0]));
        assert_eq!(c, [20.0, 21.0, 44.0, 49.0]);
    }
}
