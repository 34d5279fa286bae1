//! sluice-cni: the CNI plugin chained after flannel. The I/O edge: read the environment and
//! stdin, ask the agent, print the result. Decisions are in `sluice_cni::plugin`.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sluice_cni::cni::{CniError, Env, FALLBACK_VERSION, SUPPORTED_VERSIONS};
use sluice_cni::config::DEFAULT_TIMEOUT;
use sluice_cni::plugin::{self, Outcome, Plan};
use sluice_cni::protocol::{client, codes, DEFAULT_SOCKET};

fn help() -> String {
    format!(
        "\
sluice-cni {version}: a CNI plugin chained after flannel. On ADD it tells the sluice agent on
this node about the new pod (namespace/name, IPs, host veth) and waits until the agent has the
pod's NetworkPolicy rules in the kernel, so no pod starts without its policy. It changes nothing
in the result: prevResult is passed through. Invoked by the container runtime (CNI_COMMAND
ADD, DEL, CHECK, STATUS, GC, VERSION; CNI spec versions {versions}), not by people.

Configure it as the last plugin of flannel's conflist (/etc/cni/net.d/10-flannel.conflist):

  {{
    \"name\": \"cbr0\",
    \"cniVersion\": \"0.3.1\",
    \"plugins\": [
      {{ \"type\": \"flannel\", \"delegate\": {{ \"hairpinMode\": true, \"isDefaultGateway\": true }} }},
      {{ \"type\": \"portmap\", \"capabilities\": {{ \"portMappings\": true }} }},
      {{ \"type\": \"sluice-cni\", \"agentSocket\": \"{socket}\", \"timeout\": \"{timeout}\", \"failMode\": \"closed\" }}
    ]
  }}

fields (all optional; any other field is an error, CNI code 7):
  agentSocket  the agent's unix socket (default {socket})
  timeout      how long ADD waits for the agent, Go style: \"10s\", \"500ms\" (default {timeout});
               also bounds DEL, CHECK, STATUS and GC
  failMode     what ADD does when the agent is down, times out or refuses:
               \"closed\" (default): fail with CNI code 11 (try again later); the runtime retries
               and the pod does not start without its rules
               \"open\": succeed and print a warning on stderr; the pod may start unprotected
  logFile      append one line per invocation to this file (absolute path)

DEL always succeeds (it is best effort: the agent also drops pods that are gone). STATUS fails
with code 50 while the agent is not reachable or not synced.
",
        version = env!("CARGO_PKG_VERSION"),
        versions = SUPPORTED_VERSIONS.join(", "),
        socket = DEFAULT_SOCKET,
        timeout = DEFAULT_TIMEOUT,
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args
        .iter()
        .any(|a| a == "--help" || a == "-h" || a == "help")
    {
        print!("{}", help());
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("sluice-cni {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let env = Env::from_lookup(|k| std::env::var(k).ok());
    if env.command.is_none() && std::io::stdin().is_terminal() {
        // A person ran it: explain, and still answer like a plugin on stdout.
        eprint!("{}", help());
    }

    // The config comes on stdin; without a command there is nothing to read it for, and VERSION
    // typed at a terminal should not wait for input.
    let mut stdin = Vec::new();
    let skip = env.command.is_none()
        || (env.command.as_deref() == Some("VERSION") && std::io::stdin().is_terminal());
    if !skip {
        if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
            let err = CniError::new(codes::IO_FAILURE, "cannot read stdin", e.to_string());
            return emit(&Outcome::failure(&err, FALLBACK_VERSION, "(read)"), None);
        }
    }

    match plugin::plan(&env, &stdin) {
        // no config we could trust for a log file, or nothing worth logging
        Plan::Done(outcome) => emit(&outcome, None),
        Plan::Call(call) => {
            let start = Instant::now();
            let answer = client::call(
                &call.config.agent_socket,
                &call.request,
                call.config.timeout,
            );
            let mut outcome = plugin::finish(&call, answer);
            outcome.summary = format!("{} in {}ms", outcome.summary, start.elapsed().as_millis());
            emit(&outcome, call.config.log_file.as_deref())
        }
    }
}

/// Print the outcome (stdout: result or error JSON; stderr: warnings), log it, exit with it.
fn emit(outcome: &Outcome, log_file: Option<&std::path::Path>) -> ExitCode {
    for w in &outcome.warnings {
        eprintln!("sluice-cni: {w}");
    }
    if let Some(path) = log_file {
        log(path, outcome);
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    ExitCode::from(u8::try_from(outcome.exit_code).unwrap_or(1))
}

/// Append the summary and warnings to the log file; a log we cannot write only costs a warning.
fn log(path: &std::path::Path, outcome: &Outcome) {
    let stamp = timestamp();
    let pid = std::process::id();
    let mut text = format!("{stamp} sluice-cni[{pid}] {}\n", outcome.summary);
    for w in &outcome.warnings {
        text.push_str(&format!("{stamp} sluice-cni[{pid}] {w}\n"));
    }
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = result {
        eprintln!("sluice-cni: cannot write logFile {}: {e}", path.display());
    }
}

/// Now as `2026-11-25T22:43:15.494Z` (UTC), without a date library.
fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // civil_from_days (Howard Hinnant), for days since 1970-01-01
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}
