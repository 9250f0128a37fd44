//! COM1 (port 0x3f8, a 16550 UART): output for the log and the protocol, and polled input
//! (LSR bit 0, "data ready") for the runner's command lines. QEMU's UART ignores the baud
//! rate; the initialisation just sets 8N1 and enables the FIFOs.

use core::fmt::{self, Write};

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
/// Line status register: bit 0 data ready, bit 5 transmit holding register empty.
const LSR: u16 = COM1 + 5;
/// The longest command line kept; longer lines are cut.
pub const LINE_MAX: usize = 128;

/// Sets COM1 to 115200 8N1 with FIFOs, interrupts off.
pub fn init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1: 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO on, cleared, 14-byte threshold
    outb(COM1 + 4, 0x03); // DTR, RTS
}

fn put(b: u8) {
    while inb(LSR) & 0x20 == 0 {
        crate::cpu::pause();
    }
    outb(COM1, b);
}

/// A byte, if one has arrived.
pub fn try_read() -> Option<u8> {
    (inb(LSR) & 1 != 0).then(|| inb(COM1))
}

/// The serial port as a `fmt::Write` sink (`\n` becomes `\r\n`).
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
    }};
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::serial::Serial, format_args!($($arg)*));
        $crate::print!("\n");
    }};
}

/// Collects input bytes into lines without blocking.
pub struct LineReader {
    buf: [u8; LINE_MAX],
    len: usize,
}

impl LineReader {
    /// An empty reader.
    pub const fn new() -> Self {
        Self {
            buf: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Reads what has arrived; returns a complete line (without the newline) when one ends.
    /// A line longer than [`LINE_MAX`] is cut; non-ASCII bytes are dropped.
    pub fn poll(&mut self) -> Option<&str> {
        while let Some(b) = try_read() {
            match b {
                b'\n' | b'\r' => {
                    if self.len == 0 {
                        continue;
                    }
                    let n = core::mem::take(&mut self.len);
                    return core::str::from_utf8(&self.buf[..n]).ok();
                }
                0x20..=0x7e if self.len < LINE_MAX => {
                    self.buf[self.len] = b;
                    self.len += 1;
                }
                _ => {}
            }
        }
        None
    }
}
