//! Waits for Ctrl-Alt-Del on the i8042 keyboard (what the VMM's control-socket `shutdown`
//! injects) by polling the controller, then resets: `cad: waiting`, `cad: got ctrl-alt-del`.

#![no_std]
#![no_main]

use guest_rt::{exit, io::inb, println};

/// Entry point: 64-bit mode.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text._start")]
pub extern "C" fn _start() -> ! {
    println!("cad: waiting");
    let mut prev = 0u8;
    loop {
        if inb(0x64) & 1 == 0 {
            core::hint::spin_loop();
            continue;
        }
        let code = inb(0x60);
        // Delete's make code after the 0xe0 prefix: 0x53 in set 1, 0x71 in set 2.
        if prev == 0xe0 && (code == 0x53 || code == 0x71) {
            println!("cad: got ctrl-alt-del");
            exit::reset()
        }
        prev = code;
    }
}
