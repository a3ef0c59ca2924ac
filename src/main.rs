//! The `sigil` binary: parse the command line, run, map errors to exit codes.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    match sigil::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
