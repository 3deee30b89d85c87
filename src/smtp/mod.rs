//! SMTP server on stdin/stdout relaying through a submission server (not built yet).

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn serve(_args: Args) -> ExitCode {
    log::error!("smtp is not implemented yet");
    ExitCode::FAILURE
}
