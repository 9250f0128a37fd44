//! One VM with one vCPU that starts directly in 64-bit long mode on our page tables.
//!
//! No firmware and no real-mode trampoline: `KVM_SET_SREGS` loads CR0 (PE, PG, WP, NE, ET),
//! CR4 (PAE), EFER (LME, LMA, NXE), CR3 (our root table) and flat segments whose hidden parts
//! match the descriptors in the guest's GDT, so exception delivery through the IDT (which
//! reloads CS from the GDT) works.

use hvmem::spt::{FlushRange, TlbFlush};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::guest;
use super::ram::GuestRam;

/// How a guest run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Every page of the range held its pattern.
    Done {
        /// Pages the read pass checked.
        pages: u64,
    },
    /// A word did not hold its pattern.
    Mismatch {
        /// Guest address of the word.
        addr: u64,
        /// What the guest read.
        found: u64,
        /// What it expected.
        expected: u64,
    },
    /// The #PF handler ran.
    PageFault {
        /// CR2: the faulting linear address.
        cr2: u64,
        /// The error code the CPU pushed.
        error: u64,
        /// The RIP of the faulting instruction.
        rip: u64,
    },
    /// Another exception's stub ran.
    Exception {
        /// Its vector.
        vector: u8,
    },
}

/// What the pattern loop is told to do.
#[derive(Debug, Clone, Copy)]
pub struct Pass {
    /// First page (inclusive).
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// Mixed into every page's pattern, so each pass writes different values.
    pub salt: u64,
    /// A page the loop leaves alone (`u64::MAX`: none).
    pub skip: u64,
}

/// The memslot guest RAM lives in.
const SLOT: u32 = 0;

/// A VM, its vCPU and its RAM. Field order matters: the vCPU and VM close before the RAM
/// their memslot points at is unmapped.
pub struct Machine {
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    ram: std::rc::Rc<GuestRam>,
}

impl Machine {
    /// Opens the KVM device: `/dev/kvm`, or the path in `HVMEM_KVM_DEVICE` (so a run can
    /// simulate a machine without KVM). `Ok(None)` only when the device does not exist; every
    /// other failure (open, stat, an API version other than 12) is an error, not a skip.
    pub fn open_kvm() -> Result<Option<Kvm>, String> {
        let path = std::env::var("HVMEM_KVM_DEVICE").unwrap_or_else(|_| "/dev/kvm".into());
        match std::path::Path::new(&path).try_exists() {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(e) => return Err(format!("stat {path}: {e}")),
        }
        let cpath = std::ffi::CString::new(path.clone()).map_err(|e| format!("{path}: {e}"))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| format!("open {path}: {e}"))?;
        match kvm.get_api_version() {
            12 => Ok(Some(kvm)),
            v => Err(format!("{path}: KVM API version {v}, want 12")),
        }
    }

    /// Creates a VM over `ram`, loads the guest's GDT/IDT/code and gives the vCPU the host's
    /// supported CPUID (so long mode, NX and the physical-address width are what KVM allows).
    pub fn new(kvm: Kvm, ram: std::rc::Rc<GuestRam>) -> Result<Self, String> {
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        ram.set_memslot(&vm, SLOT, true)?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
        guest::load(&ram);
        Ok(Self {
            vcpu,
            vm,
            _kvm: kvm,
            ram,
        })
    }

    /// Makes KVM forget every translation it derived from our page tables: the memslot is
    /// deleted (KVM zaps all shadow pages / TDP entries of the slot and flushes the guest's
    /// TLB) and added back. This is the host-side full TLB flush the test's `TlbFlush` uses.
    pub fn flush_guest_tlb(&self) -> Result<(), String> {
        self.ram.set_memslot(&self.vm, SLOT, false)?;
        self.ram.set_memslot(&self.vm, SLOT, true)
    }

    /// `KVM_TRANSLATE`: KVM's own walk of the guest page tables for `gva`, with the vCPU's
    /// current CR3. `Some(gpa)` when the address is mapped. Its `writeable` field is not
    /// returned: x86 KVM (`kvm_arch_vcpu_ioctl_translate`) sets it to 1 for every address,
    /// so write permission is judged by the guest's own stores ([`Machine::probe`]).
    pub fn kvm_translate(&self, gva: u64) -> Result<Option<u64>, String> {
        let t = self
            .vcpu
            .translate_gva(gva)
            .map_err(|e| format!("KVM_TRANSLATE {gva:#x}: {e}"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    /// Loads the special registers for 64-bit mode with `cr3` as the root table.
    pub fn enter_long_mode(&self, cr3: u64) -> Result<(), String> {
        let mut sregs = self
            .vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        let flat = |selector: u16, type_: u8, code: bool| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: u8::from(!code),
            s: 1,
            l: u8::from(code),
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(guest::CODE_SEL, 0xb, true);
        let data = flat(guest::DATA_SEL, 0x3, false);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = kvm_segment {
            base: guest::TSS,
            limit: 0x67,
            selector: guest::TSS_SEL,
            type_: 0xb, // busy 64-bit TSS
            present: 1,
            s: 0,
            ..Default::default()
        };
        sregs.ldt = kvm_segment {
            unusable: 1,
            type_: 0x2,
            ..Default::default()
        };
        sregs.gdt.base = guest::GDT;
        sregs.gdt.limit = guest::GDT_BYTES - 1;
        sregs.idt.base = guest::IDT;
        sregs.idt.limit = guest::IDT_BYTES - 1;
        const CR0_PE: u64 = 1 << 0;
        const CR0_MP: u64 = 1 << 1;
        const CR0_ET: u64 = 1 << 4;
        const CR0_NE: u64 = 1 << 5;
        const CR0_WP: u64 = 1 << 16;
        const CR0_PG: u64 = 1 << 31;
        const CR4_PAE: u64 = 1 << 5;
        const EFER_LME: u64 = 1 << 8;
        const EFER_LMA: u64 = 1 << 10;
        const EFER_NXE: u64 = 1 << 11;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA | EFER_NXE;
        sregs.cr3 = cr3;
        self.vcpu
            .set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))
    }

    /// Runs the pattern loop once, from a fresh register state, until it reports.
    pub fn run(&mut self, pass: Pass) -> Result<Exit, String> {
        self.run_from(kvm_regs {
            rip: guest::CODE,
            rdi: pass.start,
            rsi: pass.end,
            rdx: pass.salt,
            r8: pass.skip,
            ..Default::default()
        })
    }

    /// Runs the probe over `pages` (a store of `page ^ salt` to each, see
    /// [`guest::ProbeRecord`]). Returns how the run ended and, when the probe got through its
    /// whole list, one record per page.
    pub fn probe(
        &mut self,
        pages: &[u64],
        salt: u64,
    ) -> Result<(Exit, Vec<guest::ProbeRecord>), String> {
        guest::write_probe_list(&self.ram, pages);
        let exit = self.run_from(kvm_regs {
            rip: guest::PROBE_ENTRY,
            rdi: guest::PROBE_LIST,
            rsi: pages.len() as u64,
            rdx: salt,
            r10: guest::PROBE_RECORDS,
            ..Default::default()
        })?;
        let done = exit
            == Exit::Done {
                pages: pages.len() as u64,
            };
        let records = if done {
            guest::probe_records(&self.ram, pages.len())
        } else {
            Vec::new()
        };
        Ok((exit, records))
    }

    /// Runs the guest from `regs` (the stack and flags are set here) until it reports.
    fn run_from(&mut self, regs: kvm_regs) -> Result<Exit, String> {
        self.start(regs)?;
        let (port, byte, r) = self.resume()?;
        match port {
            guest::PORT_DONE => Ok(Exit::Done { pages: r.r9 }),
            guest::PORT_MISMATCH => Ok(Exit::Mismatch {
                addr: r.rax,
                found: r.rbx,
                expected: r.rcx,
            }),
            guest::PORT_PAGE_FAULT => Ok(Exit::PageFault {
                cr2: r.rax,
                error: r.rbx,
                rip: r.rcx,
            }),
            guest::PORT_EXCEPTION => Ok(Exit::Exception { vector: byte }),
            p => Err(format!("write to unknown port {p:#x} at rip {:#x}", r.rip)),
        }
    }

    /// Loads `regs` into the vCPU with the initial stack pointer and flags (interrupts off);
    /// the next [`Machine::resume`] starts there.
    pub fn start(&mut self, regs: kvm_regs) -> Result<(), String> {
        let regs = kvm_regs {
            rsp: guest::STACK_TOP,
            rflags: 0x2, // reserved bit 1; interrupts off
            ..regs
        };
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))
    }

    /// Runs the vCPU until the guest writes to an I/O port: returns the port, the byte
    /// written and the registers at that point. The next call resumes the guest after its
    /// `out` instruction, so a guest handler can exit to the host and be continued.
    pub fn resume(&mut self) -> Result<(u16, u8, kvm_regs), String> {
        let (port, byte) = loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    break (port, data.first().copied().unwrap_or(0));
                }
                // A signal to this host thread interrupted KVM_RUN: go on.
                Ok(VcpuExit::Intr) => continue,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(format!("KVM_RUN: {e}")),
                Ok(other) => {
                    let exit = format!("{other:?}");
                    let r = self
                        .vcpu
                        .get_regs()
                        .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
                    return Err(format!("unexpected exit {exit} at rip {:#x}", r.rip));
                }
            }
        };
        let r = self
            .vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        Ok((port, byte, r))
    }
}

/// hvmem's [`TlbFlush`] for the guest's page tables. Userspace has no ranged flush of a
/// guest's TLB, so every flush, ranged or not, is [`Machine::flush_guest_tlb`].
pub struct KvmTlb<'m> {
    machine: &'m Machine,
    /// `flush_range` calls.
    pub ranges: u32,
    /// `flush_all` calls.
    pub all: u32,
    /// The first flush that failed (`TlbFlush` cannot return errors).
    pub error: Option<String>,
}

impl<'m> KvmTlb<'m> {
    /// A flusher for `machine`.
    pub fn new(machine: &'m Machine) -> Self {
        Self {
            machine,
            ranges: 0,
            all: 0,
            error: None,
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.machine.flush_guest_tlb() {
            self.error.get_or_insert(e);
        }
    }
}

impl TlbFlush for KvmTlb<'_> {
    fn flush_range(&mut self, _range: FlushRange) {
        self.ranges += 1;
        self.flush();
    }

    fn flush_all(&mut self) {
        self.all += 1;
        self.flush();
    }
}
