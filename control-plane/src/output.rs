//! The CLI's output on stdout, whose reader may go away (`strait check | head
//! -3`, `strait demo | head`): Rust's `print!` would panic then.

use std::io::Write;

/// Writes `text` to stdout and flushes it.
pub fn write(text: std::fmt::Arguments) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(text).and_then(|()| out.flush())
}

/// A command's output: a reader gone ends the process quietly, with the
/// status a process killed by SIGPIPE has, as a C or Go tool's would.
pub fn print(text: std::fmt::Arguments) {
    if let Err(e) = write(text) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(128 + 13);
        }
        eprintln!("error: writing the output: {e}");
        std::process::exit(1);
    }
}
