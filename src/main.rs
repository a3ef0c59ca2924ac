//! The `sigil` binary: parse the command line, run, map errors to exit codes.

use clap::Parser;

/// Sigil: a SPIFFE certificate authority.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
