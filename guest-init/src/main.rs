//! `hearth-init`: PID 1 of a Hearth instance.

use std::process::ExitCode;

use hearth_init::bootstrap::Bootstrap;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bootstrap = if args
        .iter()
        .any(|a| a.starts_with(hearth_init::bootstrap::PREFIX))
    {
        Bootstrap::parse(args.iter().map(String::as_str))
    } else {
        match std::fs::read_to_string("/proc/cmdline") {
            Ok(cmdline) => Bootstrap::from_cmdline(&cmdline),
            Err(e) => {
                eprintln!("hearth-init: cannot read /proc/cmdline: {e}");
                return ExitCode::from(2);
            }
        }
    };
    match bootstrap {
        Ok(b) => {
            println!("hearth-init {}: {b:?}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hearth-init: {e}");
            ExitCode::from(2)
        }
    }
}
