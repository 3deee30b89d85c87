//! Entry point: parse options, start logging, hand stdin/stdout to the chosen protocol.

use clap::Parser;
use legacy_mail_proxy::cli::{Cli, Command};
use legacy_mail_proxy::{client_tls, logging, oauth2, pop3, smtp, tls, tunnel};
use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // Under inetd stdout and stderr are the client's socket: a usage error there
            // would be sent to a mail client. Show it only to a person at a terminal.
            if std::io::stderr().is_terminal() {
                let _ = e.print();
            } else {
                logging::init(logging::LogTarget::Syslog, log::LevelFilter::Error);
                log::error!("bad command line: {}", e.render());
            }
            return ExitCode::from(2);
        }
    };
    logging::init(cli.log, cli.log_level);
    // Before any thread exists: see the function.
    let default_ca_file =
        tls::avoid_parsing_ca_bundles(cli.command.backend().and_then(|b| b.ca_file.as_deref()));
    log::debug!("OpenSSL's default CA file: {default_ca_file:?}");
    // The default hook prints to stderr, which under xinetd is the client's socket.
    std::panic::set_hook(Box::new(|info| log::error!("internal error: {info}")));
    match cli.command {
        Command::Pop3(args) => pop3::serve(*args),
        Command::Smtp(args) => smtp::serve(*args),
        Command::Tunnel(args) => tunnel::serve(args),
        Command::Oauth2(args) => oauth2::admin::run(args),
        Command::Queue(args) => smtp::queue::admin::run(args),
        Command::MakeCert(args) => client_tls::make_cert::run(args),
    }
}
