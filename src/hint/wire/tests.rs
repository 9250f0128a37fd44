use std::vec;
use std::vec::Vec;

use super::*;
use crate::addr::{PAGE_SIZE, PageOrder, Pfn};
use crate::buddy::Block;
use crate::testing::Rng;

fn block(pfn: u64, order: u8) -> Block {
    Block {
        pfn: Pfn::new(pfn).unwrap(),
        order: PageOrder::new(order).unwrap(),
        reported: false,
    }
}

#[test]
fn descriptor_round_trips_and_is_little_endian() {
    let d = VirtqDesc {
        entry: ScatterEntry {
            addr: 0x0102_0304_0506_0708,
            len: 0x0a0b_0c0d,
        },
        flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        next: 0x0e0f,
    };
    let b = d.to_bytes();
    assert_eq!(
        b,
        [
            8, 7, 6, 5, 4, 3, 2, 1, 0x0d, 0x0c, 0x0b, 0x0a, 3, 0, 0x0f, 0x0e
        ]
    );
    assert_eq!(VirtqDesc::from_bytes(&b), d);
    // Every 16-byte pattern decodes and encodes back to itself.
    let mut rng = Rng::new(7);
    for _ in 0..1000 {
        let mut raw = [0u8; 16];
        for x in &mut raw {
            *x = rng.next_u64() as u8;
        }
        assert_eq!(VirtqDesc::from_bytes(&raw).to_bytes(), raw);
    }
}

#[test]
fn scatter_entry_from_block() {
    let e = ScatterEntry::from_block(&block(0x200, 9)).unwrap();
    assert_eq!(
        e,
        ScatterEntry {
            addr: 0x20_0000,
            len: 2 << 20
        }
    );
    // Order 19 is 2 GiB and fits a u32 length; order 20 (4 GiB) does not.
    assert!(ScatterEntry::from_block(&block(0, 19)).is_ok());
    assert_eq!(
        ScatterEntry::from_block(&block(0, 20)),
        Err(EncodeError::TooLarge)
    );
}

#[test]
fn report_chain_round_trips() {
    let entries: Vec<ScatterEntry> = (0..32u64)
        .map(|i| ScatterEntry::from_block(&block(i * 512 + 0x4_0000, 9)).unwrap())
        .collect();
    let mut table = vec![0u8; 64 * VIRTQ_DESC_SIZE];
    let head = encode_chain(&entries, Direction::DeviceWrites, &mut table, 10).unwrap();
    assert_eq!(head, 10);
    let back: Vec<ScatterEntry> = walk_chain(&table, head, Direction::DeviceWrites)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(back, entries);
    // The last descriptor ends the chain; the others point at the next slot and are writable.
    for (i, slot) in table.chunks_exact(16).enumerate().skip(10).take(32) {
        let d = VirtqDesc::from_bytes(slot.try_into().unwrap());
        assert_ne!(d.flags & VIRTQ_DESC_F_WRITE, 0);
        assert_eq!(d.flags & VIRTQ_DESC_F_NEXT != 0, i < 41);
        if i < 41 {
            assert_eq!(usize::from(d.next), i + 1);
        }
    }
    // The same entries read as device-readable buffers are refused.
    let mut walk = walk_chain(&table, head, Direction::DeviceReads).unwrap();
    assert_eq!(walk.next(), Some(Err(DescError::WrongDirection)));
    assert_eq!(walk.next(), None, "fused after an error");
}

#[test]
fn encode_chain_refuses_what_does_not_fit() {
    let e = [ScatterEntry { addr: 0, len: 4096 }; 4];
    let mut table = vec![0u8; 4 * VIRTQ_DESC_SIZE];
    assert_eq!(
        encode_chain(&e, Direction::DeviceWrites, &mut table, 1),
        Err(DescError::TableTooSmall)
    );
    assert_eq!(
        encode_chain(&[], Direction::DeviceWrites, &mut table, 0),
        Err(DescError::BadTable)
    );
    assert_eq!(
        encode_chain(&e, Direction::DeviceWrites, &mut [], 0),
        Err(DescError::BadTable)
    );
    assert_eq!(
        encode_chain(&e, Direction::DeviceReads, &mut table, 0),
        Ok(0)
    );
}

/// Regression (promise audit): a table that is not a whole number of 16-byte descriptors
/// was encoded into, though `walk_chain` refuses it as `BadTable`: the encoder refuses it
/// too, writing nothing.
#[test]
fn encode_chain_refuses_a_table_of_partial_descriptors() {
    let e = [ScatterEntry {
        addr: 0x1000,
        len: 4096,
    }];
    let mut table = vec![0u8; VIRTQ_DESC_SIZE + 1];
    assert_eq!(
        encode_chain(&e, Direction::DeviceWrites, &mut table, 0),
        Err(DescError::BadTable)
    );
    assert!(table.iter().all(|&b| b == 0));
    assert_eq!(
        walk_chain(&table, 0, Direction::DeviceWrites).map(|_| ()),
        Err(DescError::BadTable)
    );
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    VirtqDesc {
        entry: ScatterEntry { addr, len },
        flags,
        next,
    }
    .to_bytes()
}

#[test]
fn walk_chain_refuses_bad_tables_and_chains() {
    const W: u16 = VIRTQ_DESC_F_WRITE;
    const N: u16 = VIRTQ_DESC_F_NEXT;
    assert_eq!(
        walk_chain(&[], 0, Direction::DeviceWrites).unwrap_err(),
        DescError::BadTable
    );
    assert_eq!(
        walk_chain(&[0; 17], 0, Direction::DeviceWrites).unwrap_err(),
        DescError::BadTable
    );
    let huge = vec![0u8; (VIRTQ_MAX_SIZE + 1) * 16];
    assert_eq!(
        walk_chain(&huge, 0, Direction::DeviceWrites).unwrap_err(),
        DescError::BadTable
    );
    let one = desc(0x1000, 4096, W, 0);
    assert_eq!(
        walk_chain(&one, 1, Direction::DeviceWrites).unwrap_err(),
        DescError::IndexOutOfRange
    );

    let collect = |t: &[u8], head| -> Vec<Result<ScatterEntry, DescError>> {
        walk_chain(t, head, Direction::DeviceWrites)
            .unwrap()
            .collect()
    };
    let ok = |addr| Ok(ScatterEntry { addr, len: 4096 });
    // next beyond the table
    let t = [desc(0x1000, 4096, W | N, 5), desc(0x2000, 4096, W, 0)].concat();
    assert_eq!(collect(&t, 0), vec![Err(DescError::IndexOutOfRange)]);
    // a loop 0 -> 1 -> 0
    let t = [desc(0x1000, 4096, W | N, 1), desc(0x2000, 4096, W | N, 0)].concat();
    assert_eq!(
        collect(&t, 0),
        vec![ok(0x1000), ok(0x2000), Err(DescError::Loop)]
    );
    // a self loop
    let t = desc(0x1000, 4096, W | N, 0);
    assert_eq!(collect(&t, 0), vec![ok(0x1000), Err(DescError::Loop)]);
    // indirect and unknown flags
    let t = desc(0x1000, 4096, W | VIRTQ_DESC_F_INDIRECT, 0);
    assert_eq!(collect(&t, 0), vec![Err(DescError::Indirect)]);
    let t = desc(0x1000, 4096, W | 8, 0);
    assert_eq!(collect(&t, 0), vec![Err(DescError::UnknownFlags)]);
    // a chain that starts in the middle of the table and ends at slot 0
    let t = [desc(0xa000, 4096, W, 9), desc(0xb000, 4096, W | N, 0)].concat();
    assert_eq!(collect(&t, 1), vec![ok(0xb000), ok(0xa000)]);
}

/// Regression (adversarial audit): `from_block` trusted the block's alignment, so a
/// hand-made block (its fields are public) gave a hint its own decoder refuses.
#[test]
fn pa_order_hint_from_an_unaligned_block_is_refused() {
    assert_eq!(
        PaOrderHint::from_block(&block(1, 9)),
        Err(HintError::Unaligned)
    );
    let h = PaOrderHint::from_block(&block(0x200, 9)).unwrap();
    assert_eq!(PaOrderHint::decode(h.encode()), Ok(h));
}

#[test]
fn pa_order_hint_matches_page_to_hints_pa_order() {
    // A 2 MiB block at 1 GiB: pa | 9.
    let h = PaOrderHint::from_block(&block(0x4_0000, 9)).unwrap();
    assert_eq!(h.encode(), 0x4000_0000 | 9);
    assert_eq!(h.to_bytes(), (0x4000_0009u64).to_le_bytes());
    assert_eq!(PaOrderHint::decode(h.encode()), Ok(h));
    assert_eq!((h.addr(), h.order(), h.len()), (0x4000_0000, 9, 2 << 20));
    // Round trip over every order and a spread of aligned addresses.
    let mut rng = Rng::new(3);
    for order in 0..=HINT_MAX_ORDER {
        for _ in 0..20 {
            let addr = (rng.next_u64() >> 1) & !((PAGE_SIZE << order) - 1);
            let h = PaOrderHint::new(addr, order).unwrap();
            assert_eq!(PaOrderHint::decode(h.encode()), Ok(h));
            let bytes = h.to_bytes();
            assert_eq!(decode_hints(&bytes).collect::<Vec<_>>(), vec![Ok(h)]);
        }
    }
    // The largest block: 2^63 bytes at 2^63 ends exactly at 2^64.
    let top = PaOrderHint::new(1 << 63, HINT_MAX_ORDER).unwrap();
    assert_eq!(top.len(), 1 << 63);
}

#[test]
fn pa_order_hint_refuses_what_no_block_encodes() {
    assert_eq!(PaOrderHint::decode(52), Err(HintError::OrderTooLarge));
    assert_eq!(PaOrderHint::decode(0xfff), Err(HintError::OrderTooLarge));
    // 0x100 + 9 would truncate to order 9 in a u8 cast; it must not.
    assert_eq!(PaOrderHint::decode(0x109), Err(HintError::OrderTooLarge));
    assert_eq!(PaOrderHint::decode(0x1000 | 9), Err(HintError::Unaligned));
    assert_eq!(PaOrderHint::new(0x800, 0), Err(HintError::Unaligned));
    assert_eq!(PaOrderHint::new(0, 52), Err(HintError::OrderTooLarge));
    // Every value decodes or fails with a typed error; what decodes re-encodes to itself.
    let mut rng = Rng::new(11);
    for _ in 0..100_000 {
        let raw = rng.next_u64() & if rng.below(2) == 0 { !0xfc0 } else { !0 };
        if let Ok(h) = PaOrderHint::decode(raw) {
            assert_eq!(h.encode(), raw);
            assert!(h.addr().checked_add(h.len() - 1).is_some());
            assert_eq!(h.addr() % h.len(), 0);
        }
    }
}

#[test]
fn hint_buffers_decode_entry_by_entry() {
    let good = PaOrderHint::new(0x20_0000, 9).unwrap();
    let mut buf = Vec::new();
    buf.extend_from_slice(&good.to_bytes());
    buf.extend_from_slice(&(0x1000u64 | 9).to_le_bytes());
    buf.extend_from_slice(&good.to_bytes());
    buf.extend_from_slice(&[1, 2, 3]);
    assert_eq!(
        decode_hints(&buf).collect::<Vec<_>>(),
        vec![
            Ok(good),
            Err(HintError::Unaligned),
            Ok(good),
            Err(HintError::TrailingBytes)
        ]
    );
    assert_eq!(decode_hints(&[]).count(), 0);
}

#[test]
fn pfn_arrays_round_trip_as_runs() {
    let blocks = [
        block(0x200, 9),
        block(0x600, 0),
        block(0x7, 0),
        block(0x601, 0),
    ];
    let pfns: Vec<Pfn> = block_pfns(&blocks).collect();
    assert_eq!(pfns.len(), 515);
    // A 256-entry message, as Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX, takes three messages.
    let mut it = block_pfns(&blocks).peekable();
    let mut msgs = Vec::new();
    loop {
        let mut msg = vec![0u8; 256 * 4];
        let n = encode_pfns(&mut it, &mut msg).unwrap();
        if n == 0 {
            break;
        }
        msg.truncate(n * 4);
        msgs.push(msg);
    }
    assert_eq!(
        msgs.iter().map(Vec::len).collect::<Vec<_>>(),
        [1024, 1024, 12]
    );
    assert_eq!(&msgs[0][..8], &[0, 2, 0, 0, 1, 2, 0, 0]);
    let runs: Vec<PfnRun> = msgs
        .iter()
        .flat_map(|m| pfn_runs(m))
        .collect::<Result<_, _>>()
        .unwrap();
    let pf = |p| Pfn::new(p).unwrap();
    assert_eq!(
        runs,
        vec![
            PfnRun {
                first: pf(0x200),
                frames: 256
            },
            PfnRun {
                first: pf(0x300),
                frames: 256
            },
            PfnRun {
                first: pf(0x600),
                frames: 1
            },
            PfnRun {
                first: pf(0x7),
                frames: 1
            },
            PfnRun {
                first: pf(0x601),
                frames: 1
            },
        ]
    );
    assert_eq!(runs[0].range(), (0x20_0000, 1 << 20));
    // One big message keeps the 2 MiB block in one run.
    let mut it = block_pfns(&blocks).peekable();
    let mut msg = vec![0u8; 1024 * 4];
    let n = encode_pfns(&mut it, &mut msg).unwrap();
    let runs: Vec<_> = pfn_runs(&msg[..n * 4]).map(Result::unwrap).collect();
    assert_eq!(
        runs[0],
        PfnRun {
            first: pf(0x200),
            frames: 512
        }
    );
    assert_eq!(runs.len(), 4);
    // Blocks that touch merge into one run.
    let touching = [block(0x200, 9), block(0x400, 1)];
    let mut it = block_pfns(&touching).peekable();
    let n = encode_pfns(&mut it, &mut msg).unwrap();
    let runs: Vec<_> = pfn_runs(&msg[..n * 4]).map(Result::unwrap).collect();
    assert_eq!(
        runs,
        vec![PfnRun {
            first: pf(0x200),
            frames: 514
        }]
    );
}

#[test]
fn pfn_arrays_refuse_what_the_format_cannot_hold() {
    let big = [block(1 << 32, 0)];
    let mut it = block_pfns(&big).peekable();
    assert_eq!(
        encode_pfns(&mut it, &mut [0; 8]),
        Err(EncodeError::TooLarge)
    );
    assert!(
        it.peek().is_some(),
        "the refused frame stays in the iterator"
    );
    assert_eq!(
        pfn_runs(&[1, 0, 0, 0, 2, 0, 0, 0, 9]).collect::<Vec<_>>(),
        vec![
            Ok(PfnRun {
                first: Pfn::new(1).unwrap(),
                frames: 2
            }),
            Err(PfnError::TrailingBytes)
        ]
    );
    // u32::MAX followed by 0 is not a run (no wrap-around).
    let mut b = Vec::new();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(pfn_runs(&b).count(), 2);
}

#[test]
fn cmd_ids() {
    assert_eq!(CmdId::STOP.kind(), CmdKind::Stop);
    assert_eq!(CmdId::DONE.kind(), CmdKind::Done);
    assert_eq!(CmdId::new(2).kind(), CmdKind::Run(2));
    assert_eq!(CmdId::new(7).next_run(), CmdId::new(8));
    assert_eq!(CmdId::new(u32::MAX).next_run(), CmdId::FIRST_RUN);
    assert_eq!(CmdId::STOP.next_run(), CmdId::FIRST_RUN);
    assert_eq!(CmdId::DONE.next_run(), CmdId::FIRST_RUN);
    for raw in [0, 1, 2, 0x1234_5678, u32::MAX] {
        let id = CmdId::new(raw);
        assert_eq!(CmdId::decode(&id.to_bytes()), Ok(id));
    }
    assert_eq!(CmdId::new(0x0102_0304).to_bytes(), [4, 3, 2, 1]);
    assert_eq!(CmdId::decode(&[1, 2, 3]), Err(CmdIdError::BadLength));
    assert_eq!(CmdId::decode(&[1, 2, 3, 4, 5]), Err(CmdIdError::BadLength));
    assert_eq!(
        std::format!("{} {} {}", CmdId::STOP, CmdId::DONE, CmdId::new(9)),
        "STOP DONE run 9"
    );
}
