//! Applying scripts: one `nft` transaction per sync, through a long-lived `nft -i` session for
//! diffs and a one-shot `nft -f` for whole-table loads.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::replace::{keeping_counters_script, list_tables};
use super::{diff_script, replace_script};
use crate::compile::Ruleset;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("could not run {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("nft rejected the transaction (nothing was changed): {stderr}")]
    Rejected { stderr: String },
    #[error("the nft session failed ({0}); the next sync replaces the table")]
    Session(String),
    #[error("reading counters with {command} failed: {message}")]
    Counters { command: String, message: String },
    #[error("listing our tables with {command} failed: {message}")]
    Listing { command: String, message: String },
}

/// How long a diff may take in the session before we give up on it.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);

/// A long-lived `nft -i`: each input line is parsed and committed as one transaction, like a
/// file. Keeping it open saves the spawn (~2 ms), and, more importantly, the kernel's flush of
/// deferred destruction on netlink socket close, which waits for an RCU grace period (5-25 ms
/// measured) after any transaction that deleted something.
///
/// Completion is detected with a sentinel: after the transaction we send a line that nft rejects
/// while parsing (`sluice-sync-N`) and read output until nft echoes it back in its error.
/// Anything nft printed before the sentinel's error belongs to the transaction.
struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    sequence: u64,
}

impl Session {
    fn start(nft: &Nft) -> Result<Session, NftError> {
        let mut cmd = nft.command(&["-i"]);
        let describe = format!("{cmd:?}");
        let spawn_err = |source| NftError::Spawn {
            command: describe.clone(),
            source,
        };
        // stdout and stderr share one pipe, so output arrives in the order nft wrote it.
        let (reader, writer) = std::io::pipe().map_err(spawn_err)?;
        let writer2 = writer.try_clone().map_err(spawn_err)?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(writer)
            .stderr(writer2)
            .spawn()
            .map_err(spawn_err)?;
        // Drop our copies of the write end (moved into the command above) so EOF is seen.
        drop(cmd);
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| NftError::Session("no stdin".into()))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Session {
            child,
            stdin,
            lines,
            sequence: 0,
        })
    }

    /// Commit `commands` (one per line, no blocks spanning lines) as one transaction.
    fn apply(&mut self, commands: &str) -> Result<(), NftError> {
        self.sequence += 1;
        // Not a command, so nft rejects it while parsing: it needs nothing from the kernel (a
        // `list` would make nft fetch the whole table, every element, into its cache first).
        let sentinel = format!("sluice-sync-{}", self.sequence);
        let batch: Vec<&str> = commands
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let input = format!("{}\n{sentinel}\n", batch.join("; "));
        let broken = |e: std::io::Error| NftError::Session(e.to_string());
        self.stdin.write_all(input.as_bytes()).map_err(broken)?;
        self.stdin.flush().map_err(broken)?;
        let mut before = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(SESSION_TIMEOUT)
                .map_err(|e| NftError::Session(format!("no answer from nft: {e}")))?;
            if line.trim() == sentinel {
                break;
            }
            before.push(line);
        }
        // The caret line under the echoed sentinel.
        let _ = self.lines.recv_timeout(SESSION_TIMEOUT);
        // The last line before the echo is the sentinel's own "Error: ...".
        before.pop();
        if before.is_empty() {
            Ok(())
        } else {
            Err(NftError::Rejected {
                stderr: before.join("\n").trim().to_string(),
            })
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where `nft` runs: this network namespace, or a named one (`ip netns exec`).
#[derive(Clone, Debug, Default)]
pub struct Nft {
    pub netns: Option<String>,
}

impl Nft {
    pub fn in_netns(netns: impl Into<String>) -> Self {
        Self {
            netns: Some(netns.into()),
        }
    }

    pub(super) fn command(&self, args: &[&str]) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "nft"]).args(args);
                c
            }
            None => {
                let mut c = Command::new("nft");
                c.args(args);
                c
            }
        }
    }

    /// Run `nft args` to the end: the command as text (for errors) and its output.
    pub(super) fn output(&self, args: &[&str]) -> Result<(String, std::process::Output), NftError> {
        let mut cmd = self.command(args);
        let command = format!("{cmd:?}");
        match cmd.output() {
            Ok(out) => Ok((command, out)),
            Err(source) => Err(NftError::Spawn { command, source }),
        }
    }

    /// Run a script as one atomic transaction.
    pub fn apply(&self, script: &str) -> Result<(), NftError> {
        let mut cmd = self.command(&["-f", "-"]);
        let describe = format!("{cmd:?}");
        let spawn_err = |source| NftError::Spawn {
            command: describe.clone(),
            source,
        };
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_err)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(NftError::Rejected {
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}

/// What one sync did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The table was replaced whole (first sync, or after a failure).
    pub full: bool,
    /// Commands in the transaction (0: nothing changed, nothing ran).
    pub commands: usize,
}

/// The table as last applied, kept in memory so that each sync applies only the difference
/// (never reading big sets back from the kernel).
#[derive(Default)]
pub struct TableState {
    nft: Nft,
    applied: Option<Ruleset>,
    session: Option<Session>,
}

impl std::fmt::Debug for TableState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableState")
            .field("nft", &self.nft)
            .field("applied", &self.applied.is_some())
            .finish()
    }
}

impl TableState {
    pub fn new(nft: Nft) -> Self {
        Self {
            nft,
            applied: None,
            session: None,
        }
    }

    /// Diffs go through the session (started on first use); whole-table loads through `nft -f`,
    /// since a full table spans lines.
    fn run(&mut self, script: &str, full: bool) -> Result<(), NftError> {
        if full {
            return self.nft.apply(script);
        }
        if self.session.is_none() {
            self.session = Some(Session::start(&self.nft)?);
        }
        let Some(session) = self.session.as_mut() else {
            return Err(NftError::Session("not started".into()));
        };
        let result = session.apply(script);
        if matches!(result, Err(NftError::Session(_))) {
            // Unknown state of the process: start afresh next time.
            self.session = None;
        }
        result
    }

    /// Replace both tables whole, keeping what the counters the ruleset still names counted
    /// (`replace` module). `None` when that cannot be done (the listing failed, a table holds
    /// objects we never create, nft rejected it): then the caller deletes the tables instead.
    fn replace_keeping_counters(&mut self, desired: &Ruleset) -> Option<Applied> {
        let (inet, bridge) = list_tables(&self.nft)
            .map_err(|error| {
                tracing::info!(%error, "replacing the tables without keeping their counters")
            })
            .ok()?;
        let Some(script) = keeping_counters_script(desired, inet.as_ref(), bridge.as_ref()) else {
            tracing::info!(
                ?inet,
                ?bridge,
                "a table holds objects sluice never creates: deleting it whole"
            );
            return None;
        };
        match self.nft.apply(&script) {
            Ok(()) => {
                self.applied = Some(desired.clone());
                Some(Applied {
                    full: true,
                    commands: super::command_count(&script),
                })
            }
            Err(error) => {
                tracing::info!(
                    %error,
                    "the replace that keeps the counters was rejected; deleting the tables \
                     instead (what was counted since the last read is lost)"
                );
                None
            }
        }
    }

    /// Forget what was applied, so the next sync replaces the table whole: the periodic resync
    /// that repairs whatever someone else did to the table.
    pub fn invalidate(&mut self) {
        self.applied = None;
    }

    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Bring the kernel to `desired` in one transaction. After a failure the state is unknown,
    /// so the next sync replaces the table whole.
    pub fn sync(&mut self, desired: &Ruleset) -> Result<Applied, NftError> {
        let (script, full) = match &self.applied {
            None => {
                if let Some(applied) = self.replace_keeping_counters(desired) {
                    return Ok(applied);
                }
                (replace_script(desired), true)
            }
            Some(old) => match diff_script(old, desired) {
                None => {
                    return Ok(Applied {
                        full: false,
                        commands: 0,
                    })
                }
                Some(s) => (s, false),
            },
        };
        let commands = super::command_count(&script);
        match self.run(&script, full) {
            Ok(()) => {
                self.applied = Some(desired.clone());
                Ok(Applied { full, commands })
            }
            Err(e) => {
                self.applied = None;
                Err(e)
            }
        }
    }
}
