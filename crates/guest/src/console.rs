//! Messages for whoever reads the VM's console (the host's `console.log`).

use std::io::Write;

/// Writes one line to the console; failures are ignored (there is nowhere else to report them).
pub fn log(msg: std::fmt::Arguments<'_>) {
    // why: the kernel gives PID 1 /dev/console as stderr; if the initramfs lacks
    // /dev/console there is no stderr, and a log line must never panic PID 1.
    let line = format!("hearth-guest: {msg}\n");
    match std::fs::OpenOptions::new().write(true).open("/dev/console") {
        Ok(mut console) => {
            let _ = console.write_all(line.as_bytes());
        }
        Err(_) => {
            let _ = std::io::stderr().write_all(line.as_bytes());
        }
    }
}

/// `log!("...", args)`: one line on the console.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::console::log(format_args!($($arg)*)) };
}

/// Writes `text` as is to /dev/console (the probe marker, panics).
pub fn write_raw(text: &str) {
    if let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = console.write_all(text.as_bytes());
    } else {
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}
