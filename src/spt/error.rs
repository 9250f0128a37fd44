//! One small error enum per page-table operation. An error caused by the arguments is
//! found before anything changes; the exceptions (running out of table memory halfway, a
//! table entry pointing outside table memory) are documented on the operation.

use core::fmt;

use super::ops::RangeError;
use super::walk::WalkError;

macro_rules! error_enum {
    ($(#[$doc:meta])* $ty:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $ty {
            $($(#[$vdoc])* $variant,)*
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $(Self::$variant => $text,)*
                })
            }
        }

        impl core::error::Error for $ty {}
    };
}

error_enum!(
    /// Why [`PageTable::new`](super::PageTable::new) failed.
    NewError {
        /// The table memory has no free table for the root.
        OutOfTables => "no table memory left for the root table",
    }
);

error_enum!(
    /// Why [`PageTable::map`](super::PageTable::map) refused or stopped.
    MapError {
        /// The input address, the physical address or the length is not aligned to 4 KiB
        /// (or to the page size a forced size asks for).
        Unaligned => "address or length not aligned to the page size",
        /// The range reaches beyond the format's input addresses or the physical address
        /// space.
        OutOfRange => "range beyond the input or physical address space",
        /// The flags lack the bits every leaf needs (x86 PRESENT, EPT READ).
        BadFlags => "leaf flags without the bits that make an entry present",
        /// The forced page size is one the format cannot map.
        UnsupportedSize => "page size the format cannot map",
        /// Part of the range is already mapped.
        AlreadyMapped => "part of the range is already mapped",
        /// A forced page size would replace an existing table.
        TableInTheWay => "a table occupies an entry the forced page size needs",
        /// Table memory ran out. The part of the range before the failure is mapped.
        OutOfTables => "no table memory left",
        /// A table entry points outside table memory.
        BadTable => "table entry points outside table memory",
    }
);

error_enum!(
    /// Why [`PageTable::unmap`](super::PageTable::unmap) refused.
    UnmapError {
        /// The address or the length is not aligned to 4 KiB.
        Unaligned => "address or length not aligned to 4 KiB",
        /// The range reaches beyond the format's input addresses.
        OutOfRange => "range beyond the input address space",
        /// The range covers only part of a huge page; split it first.
        SplitsHugePage => "range covers only part of a huge page",
        /// A table entry points outside table memory.
        BadTable => "table entry points outside table memory",
        /// The range covers only part of a table another parent entry links too: clearing
        /// those leaves would unmap them for every parent, and unlinking the table would
        /// unmap the rest of it for this one. Unmap the whole table's range, or give this
        /// parent a table of its own first.
        SplitsSharedTable => "range covers only part of a table shared with another parent",
    }
);

error_enum!(
    /// Why [`PageTable::protect`](super::PageTable::protect) refused.
    ProtectError {
        /// The address or the length is not aligned to 4 KiB.
        Unaligned => "address or length not aligned to 4 KiB",
        /// The range reaches beyond the format's input addresses.
        OutOfRange => "range beyond the input address space",
        /// The flags would clear a bit every leaf needs (x86 PRESENT, EPT READ).
        BadFlags => "flags would make leaves non-present",
        /// The range covers only part of a huge page; split it first.
        SplitsHugePage => "range covers only part of a huge page",
        /// A table entry points outside table memory.
        BadTable => "table entry points outside table memory",
    }
);

error_enum!(
    /// Why [`PageTable::translate`](super::PageTable::translate) found no translation.
    TranslateError {
        /// The address is beyond the format's input addresses.
        OutOfRange => "address beyond the input address space",
        /// Nothing is mapped at the address.
        NotMapped => "address not mapped",
        /// A table entry points outside table memory.
        BadTable => "table entry points outside table memory",
    }
);

error_enum!(
    /// Why [`PageTable::split`](super::PageTable::split) refused or stopped. Running out of
    /// tables is not an error: the split stops and says where to resume.
    SplitError {
        /// The address or the length is not aligned to 4 KiB.
        Unaligned => "address or length not aligned to 4 KiB",
        /// The range reaches beyond the format's input addresses.
        OutOfRange => "range beyond the input address space",
        /// A table entry points outside table memory.
        BadTable => "table entry points outside table memory",
    }
);

error_enum!(
    /// Why [`split_entry`](super::split_entry) refused. Nothing changes on error.
    SplitEntryError {
        /// The entry is not a huge leaf (any more: in shared mode someone changed it).
        NotHuge => "entry is not a huge leaf",
        /// The child table is not in table memory.
        BadChild => "child table outside table memory",
        /// A reused child maps something other than the huge leaf's pages.
        ChildMismatch => "existing child maps other pages than the huge leaf",
    }
);

error_enum!(
    /// Why [`PageTable::collapse`](super::PageTable::collapse) refused.
    CollapseError {
        /// The address or the length is not aligned to 4 KiB.
        Unaligned => "address or length not aligned to 4 KiB",
        /// The range reaches beyond the format's input addresses.
        OutOfRange => "range beyond the input address space",
        /// The largest level asked for cannot hold leaves in this format (or is level 1).
        BadLevel => "level cannot hold huge leaves",
        /// A table entry points outside table memory.
        BadTable => "table entry points outside table memory",
    }
);

/// Maps a walk error whose visitor error is already the operation's error.
pub(crate) fn flatten<E>(e: WalkError<E>, out_of_range: E, bad_table: E) -> E {
    match e {
        WalkError::OutOfRange => out_of_range,
        WalkError::BadTable(_) => bad_table,
        WalkError::Visitor(e) => e,
    }
}

macro_rules! from_range_error {
    ($($ty:ident),*) => {
        $(
            impl From<RangeError> for $ty {
                fn from(e: RangeError) -> Self {
                    match e {
                        RangeError::Unaligned => Self::Unaligned,
                        RangeError::OutOfRange => Self::OutOfRange,
                    }
                }
            }
        )*
    };
}

from_range_error!(
    MapError,
    UnmapError,
    ProtectError,
    SplitError,
    CollapseError
);
