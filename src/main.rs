//! The `sigil` binary: parse the command line, run, map errors to exit codes.

use std::io::Write;
use std::process::ExitCode;

// mimalloc instead of glibc's malloc: glibc grows each thread's arena a page
// at a time (an `mprotect` per step), which dominated bursts of new streams
// and the store's read at start (see docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match sigil::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let args: Vec<String> = std::env::args().collect();
            let json = args
                .windows(2)
                .any(|w| w[0] == "--output" && w[1] == "json")
                || args.iter().any(|a| a == "--output=json");
            if json {
                // Scripts asking for JSON get their errors as JSON too.
                let error = serde_json::json!({ "error": format!("{e:#}") });
                let _ = writeln!(std::io::stdout(), "{error}");
            } else {
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
            }
            // `policy check` gates scripts: 0 allow, 1 deny, 2 error.
            if args.get(1).map(String::as_str) == Some("policy") {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
