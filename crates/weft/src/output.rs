//! Everything the binary prints on standard output goes through [`say!`](crate::say), so that a
//! closed pipe (`weft ledger show DIR | head -1`) ends the command quietly, as Unix tools do,
//! instead of panicking inside `println!`.

use std::io::Write;

/// Standard output was closed by its reader: the command stops, and it is not a failure.
#[derive(Debug)]
pub struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for Closed {}

/// Writes one line to standard output; a closed pipe becomes [`Closed`].
pub fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args).and_then(|()| out.write_all(b"\n")).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(Closed),
        _ => anyhow::Error::new(e).context("writing to standard output"),
    })
}

/// Whether an error means only that standard output went away.
pub fn is_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<Closed>())
        || error.chain().any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        })
}

/// `println!` that returns from the enclosing function (with `?`) when standard output is gone.
#[macro_export]
macro_rules! say {
    () => {
        $crate::output::line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))?
    };
}
