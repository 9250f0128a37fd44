//! `ReportPolicy`: what a reporting pass may take, and when a pass is worth running.

use core::fmt;

use crate::addr::PageOrder;

/// The rules of free-page reporting (Linux: `page_reporting_order`, the budget and watermark
/// of `page_reporting_cycle` / `page_reporting_process_zone`, the threshold of
/// `page_reporting_notify_free`). The batch capacity is not here: it is the `CAP` const
/// generic of [`Reporter`](super::Reporter) (Linux `PAGE_REPORTING_CAPACITY`, 32).
///
/// ```
/// use hvmem::hint::guest::ReportPolicy;
/// use hvmem::PageOrder;
///
/// let policy = ReportPolicy {
///     low_watermark: 4096, // keep 16 MiB for the guest
///     ..ReportPolicy::DEFAULT
/// };
/// assert_eq!(policy.min_order, PageOrder::HUGE_2M);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReportPolicy {
    /// The smallest block order reported. Default 9: one 2 MiB host huge page per block, so a
    /// report never costs the host a huge-page split (Tsirkin, "kvm: Add guest side support for
    /// free memory hints", 2019: Linux's `pageblock_order`). Smaller orders stay unreported.
    pub min_order: PageOrder,
    /// Free frames the guest keeps for itself (Linux `low_wmark_pages(zone)`). A pass only
    /// isolates a block while, after taking it, at least `low_watermark + (CAP << min_order)`
    /// frames stay free on the lists: the guard Linux checks before a zone's pass, checked
    /// here before every isolation, so a pass never pushes the guest below it.
    pub low_watermark: u64,
    /// Per pass and per order, take at most `CAP * ceil(free / (CAP * budget_divisor))`
    /// blocks, `free` being the order's free blocks (reported or not) when the pass reaches
    /// it: about `1 / budget_divisor` of the list, in whole batches. Linux uses 16
    /// (`DIV_ROUND_UP(area->nr_free, PAGE_REPORTING_CAPACITY * 16)`), so an idle guest is
    /// fully reported after some 16 passes while no single pass holds much memory. 1 lets a
    /// pass take every unreported block. Must not be 0.
    pub budget_divisor: u32,
    /// [`Reporter::on_free`](super::Reporter::on_free) asks for a pass once this many frames
    /// were freed in blocks of `min_order` or larger since the last pass began. Default: one
    /// `min_order` block, as Linux requests on the first such free and leaves the delay to
    /// the embedder (Linux waits 2 s to let a batch build up).
    pub notify_frames: u64,
}

impl ReportPolicy {
    /// Linux's defaults: order 9, no watermark of its own, 1/16 of a list per pass, a pass
    /// requested by the first freed order-9 block.
    pub const DEFAULT: Self = Self {
        min_order: PageOrder::HUGE_2M,
        low_watermark: 0,
        budget_divisor: 16,
        notify_frames: PageOrder::HUGE_2M.frames(),
    };

    /// Checks the fields that have invalid values.
    pub const fn validate(&self) -> Result<(), PolicyError> {
        if self.budget_divisor == 0 {
            return Err(PolicyError::ZeroBudgetDivisor);
        }
        Ok(())
    }

    /// Free frames a pass always leaves on the lists: `low_watermark + (cap << min_order)`.
    pub const fn guard_frames(&self, cap: usize) -> u64 {
        self.low_watermark
            .saturating_add((cap as u64).saturating_mul(self.min_order.frames()))
    }

    /// The most blocks of one order a pass takes when the order has `free` free blocks.
    pub const fn budget_blocks(&self, cap: usize, free: u64) -> u64 {
        let cap = cap as u64;
        let per_call = cap.saturating_mul(self.budget_divisor as u64);
        if per_call == 0 {
            return 0;
        }
        free.div_ceil(per_call).saturating_mul(cap)
    }
}

impl Default for ReportPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why [`Reporter::new`](super::Reporter::new) refused a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    /// `budget_divisor` is 0.
    ZeroBudgetDivisor,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ZeroBudgetDivisor => "report budget divisor is zero",
        })
    }
}

impl core::error::Error for PolicyError {}
