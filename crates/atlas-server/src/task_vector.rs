//! (to be written)

#[derive(clap::Subcommand)]
pub enum Command {}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {}
}
