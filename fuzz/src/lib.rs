//! What the fuzz targets share: the op-sequence input type and an optional report of the
//! longest sequence a run has executed.
//!
//! # Why not `Vec<Op>`
//!
//! `arbitrary` decodes a `Vec<T>` (even from all the remaining bytes) as
//! `(continue: bool, T)*`: one byte before every element, and the sequence ends at the first
//! continuation byte with a clear low bit. A single mutated byte in the middle of an input
//! cuts the sequence there, and random bytes decode to two ops on average. [`Ops`] decodes
//! ops back to back until the bytes run out, so an input of `n` bytes is about
//! `n / (bytes per op)` ops and every byte libFuzzer appends lengthens the sequence.
//!
//! # Measuring depth
//!
//! With `HVMEM_FUZZ_LONGEST=1` in the environment, each target prints a line to stderr every
//! time it runs a longer op sequence than before, and once the op type's `size_hint`.
//! Replaying a corpus prints its longest sequence last:
//!
//! ```text
//! HVMEM_FUZZ_LONGEST=1 cargo +nightly fuzz run buddy_ops corpus/buddy_ops -- -runs=0 2>&1 | grep longest
//! ```

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use arbitrary::{Arbitrary, Result, Unstructured};

/// An op sequence decoded back to back from the remaining input (see the crate docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Ops<T> {
    /// The ops, in order.
    pub ops: Vec<T>,
    /// Input bytes they were decoded from.
    pub bytes: usize,
}

impl<T: fmt::Debug> fmt::Debug for Ops<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.ops.fmt(f)
    }
}

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Ops<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        // Not the last field of an input: `Vec`'s own encoding, which knows where it ends.
        let before = u.len();
        let ops = Vec::<T>::arbitrary(u)?;
        Ok(Self {
            ops,
            bytes: before - u.len(),
        })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> Result<Self> {
        let bytes = u.len();
        let mut ops = Vec::new();
        // Every op takes at least one byte (an enum's variant index is read first), so this
        // ends; a last op cut short decodes with zeroes for its missing bytes.
        while !u.is_empty() {
            ops.push(T::arbitrary(&mut u)?);
        }
        Ok(Self { ops, bytes })
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (0, None)
    }
}

/// Whether `HVMEM_FUZZ_LONGEST` is set (read once).
fn reporting() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HVMEM_FUZZ_LONGEST").is_some_and(|v| v != "0"))
}

/// Notes the sequence a target is about to run; with `HVMEM_FUZZ_LONGEST` set, prints each
/// new longest one (and, the first time, `T`'s encoded size bounds).
pub fn note_len<'a, T: Arbitrary<'a>>(target: &str, ops: &Ops<T>) {
    note::<T>(target, ops.ops.len(), ops.bytes);
}

/// [`note_len`] for `n` ops decoded from `bytes` input bytes.
pub fn note<'a, T: Arbitrary<'a>>(target: &str, n: usize, bytes: usize) {
    static LONGEST: AtomicUsize = AtomicUsize::new(0);
    static HINT: OnceLock<()> = OnceLock::new();
    if !reporting() {
        return;
    }
    HINT.get_or_init(|| {
        let (lo, hi) = T::size_hint(0);
        eprintln!(
            "hvmem-fuzz {target}: {} size_hint: {lo}..={} bytes per op",
            std::any::type_name::<T>(),
            hi.map_or("unbounded".into(), |h| h.to_string()),
        );
    });
    if n > LONGEST.fetch_max(n, Ordering::Relaxed) {
        let per_op = if n == 0 { 0.0 } else { bytes as f64 / n as f64 };
        eprintln!(
            "hvmem-fuzz {target}: longest op sequence so far: {n} ops ({bytes} bytes, {per_op:.1} bytes/op)"
        );
    }
}
