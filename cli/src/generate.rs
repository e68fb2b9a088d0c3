//! `distlock completions` and `distlock man`: generated from the same clap definition as
//! the parser, so they cannot drift from it.

use std::io;
use std::path::Path;

use clap::CommandFactory;

use crate::cli::Cli;

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "distlock", &mut io::stdout());
}

/// Writes the man page to stdout, or `distlock.1` and one page per subcommand into `dir`.
pub fn man(dir: Option<&Path>) -> io::Result<()> {
    let command = Cli::command();
    match dir {
        None => clap_mangen::Man::new(command).render(&mut io::stdout()),
        Some(dir) => clap_mangen::generate_to(command, dir),
    }
}
