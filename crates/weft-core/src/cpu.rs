//! Which vector instructions the kernels may use: one decision per process, shared by the
//! aggregation kernels here and the model's matrix products, so that `WEFT_NO_AVX2` switches
//! every kernel at once (and `WEFT_NO_AVX512` the matrix products' widest build). Every wide build computes the same bits as the portable one (each
//! kernel tests it), so the choice changes speed, never results.

/// Whether the AVX2 (with FMA) builds of the kernels may run: the CPU has both and
/// `WEFT_NO_AVX2` is not set (it forces the portable builds, for comparison). Decided once.
pub fn wide_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            std::env::var_os("WEFT_NO_AVX2").is_none()
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the AVX-512 build of the matrix products may run: [`wide_vectors`] holds, the CPU has
/// AVX-512F, and `WEFT_NO_AVX512` is not set (it keeps the AVX2 build, for comparison). Decided
/// once.
pub fn widest_vectors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDEST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| {
            wide_vectors()
                && std::env::var_os("WEFT_NO_AVX512").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
