//! Reference models, op enums and the one deterministic [`Rng`] shared by the unit tests,
//! `tests/`, `benches/`, `examples/` and the cargo-fuzz targets.
//!
//! Compiled for `cfg(test)`, `cfg(fuzzing)` (cargo-fuzz passes `--cfg fuzzing`) and the
//! non-default `testing` feature, which the crate's own dev-dependency on itself turns on for
//! tests, benches and examples and the fuzz crate turns on too. Hidden from the docs and not
//! part of the public API: it changes whenever the tests need it to. Each harness applies one op to the real structure and to
//! a deliberately simple model, compares the two, and audits the invariants of DESIGN.md
//! after every op. Harness failures are returned as `Err(String)`; the fuzz targets turn them
//! into crashes, the tests into assertion failures.

pub mod buddy;
pub mod mmu;
pub mod report;
pub mod spt;
pub mod spt_raw;

/// A small deterministic generator (xorshift64*), so randomized tests replay exactly.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
pub mod balloon;
pub mod receiver;
