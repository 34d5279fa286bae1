//! The plugin's pure core: environment + stdin → what to ask the agent ([`plan`]), and the
//! agent's answer (or why there was none) → what to print and how to exit ([`finish`]).
//! No I/O here; `main.rs` reads the input, talks to the agent and writes the output.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::cni::{self, CniError, Command, Env, FALLBACK_VERSION};
use crate::config::{self, FailMode, PluginConfig};
use crate::prev_result::pod_network;
use crate::protocol::{codes, AddRequest, Attachment, ClientError, Request, Response};

/// What an invocation ends with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// For stdout: a result, an error result, or nothing.
    pub stdout: String,
    /// For stderr (and the log file), one line each.
    pub warnings: Vec<String>,
    pub exit_code: i32,
    /// One line for the log file.
    pub summary: String,
}

impl Outcome {
    fn success(stdout: String, summary: String) -> Outcome {
        Outcome {
            stdout,
            warnings: Vec::new(),
            exit_code: 0,
            summary,
        }
    }

    /// An error result on stdout and exit 1.
    pub fn failure(err: &CniError, cni_version: &str, command: &str) -> Outcome {
        Outcome {
            stdout: err.render(cni_version),
            warnings: Vec::new(),
            exit_code: 1,
            summary: format!("{command} failed: {err}"),
        }
    }
}

/// A request for the agent, and what to do with the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub command: Command,
    pub config: PluginConfig,
    pub request: Request,
    /// Who this is about, for messages: `pod default/web (c1, eth0)`.
    pub subject: String,
    /// Found while planning (a DEL with a config it cannot use); [`finish`] passes them on.
    pub warnings: Vec<String>,
}

/// What [`plan`] decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Nothing to ask: print and exit (VERSION, errors, a DEL that cannot be sent).
    Done(Outcome),
    /// Ask the agent, then [`finish`].
    Call(Box<Call>),
}

/// Decide what to do from the environment and the config on stdin.
pub fn plan(env: &Env, stdin: &[u8]) -> Plan {
    let version = config::sniff_version(stdin).unwrap_or_else(|| FALLBACK_VERSION.to_string());
    let command = match env.command() {
        Ok(c) => c,
        Err(e) => return Plan::Done(Outcome::failure(&e, &version, "(no command)")),
    };
    let name = command.as_str();
    let result = match command {
        Command::Version => {
            return Plan::Done(Outcome::success(
                cni::version_result(&version),
                "VERSION".into(),
            ))
        }
        Command::Del => return plan_del(env, stdin),
        Command::Add => plan_add(env, stdin),
        Command::Check => plan_check(env, stdin),
        Command::Status => plan_status(stdin),
        Command::Gc => plan_gc(stdin),
    };
    match result {
        Ok(call) => Plan::Call(Box::new(call)),
        Err(e) => Plan::Done(Outcome::failure(&e, &version, name)),
    }
}

fn plan_add(env: &Env, stdin: &[u8]) -> Result<Call, CniError> {
    let config = config::parse(stdin)?;
    let Some(prev) = &config.prev_result else {
        return Err(CniError::new(
            codes::INVALID_CONFIG,
            "no prevResult",
            "ADD got no prevResult: sluice-cni must be chained after flannel (put it after \
             flannel in the conflist's plugins)",
        ));
    };
    let (container_id, ifname, netns) = env.require(Command::Add)?;
    let args = env.cni_args()?;
    let (namespace, pod, pod_uid) = pod_identity(&args)?;
    let network = pod_network(prev, &ifname)?;
    let subject = format!("pod {namespace}/{pod} ({container_id}, {ifname})");
    let request = Request::Add(AddRequest {
        container_id,
        ifname,
        netns: netns.unwrap_or_default(),
        namespace,
        pod,
        pod_uid,
        ips: network.ips,
        host_veth: network.host_veth,
        timeout_ms: config.timeout.as_millis().try_into().unwrap_or(u64::MAX),
    });
    Ok(Call {
        command: Command::Add,
        config,
        request,
        subject,
        warnings: Vec::new(),
    })
}

/// K8S_POD_NAMESPACE and K8S_POD_NAME (required: policy is about pods) and K8S_POD_UID.
fn pod_identity(
    args: &BTreeMap<String, String>,
) -> Result<(String, String, Option<String>), CniError> {
    let get = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME")) {
        (Some(ns), Some(pod)) => Ok((ns, pod, get("K8S_POD_UID"))),
        (ns, pod) => {
            let missing: Vec<&str> = [("K8S_POD_NAMESPACE", ns), ("K8S_POD_NAME", pod)]
                .into_iter()
                .filter(|(_, v)| v.is_none())
                .map(|(k, _)| k)
                .collect();
            Err(CniError::new(
                codes::INVALID_ENV,
                "invalid environment: CNI_ARGS",
                format!(
                    "CNI_ARGS lacks {} (the pod's identity, which the container runtime passes \
                     for Kubernetes pods)",
                    missing.join(" and ")
                ),
            ))
        }
    }
}

/// CNI 0.4.0 introduced CHECK, 1.1.0 STATUS and GC; like libcni's skel, refuse them for older
/// configs (code 1).
fn require_version(config: &PluginConfig, command: Command, since: &str) -> Result<(), CniError> {
    let idx = |v: &str| cni::SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    if idx(&config.cni_version) < idx(since) {
        return Err(CniError::new(
            codes::INCOMPATIBLE_VERSION,
            format!("config version does not allow {}", command.as_str()),
            format!(
                "{} needs cniVersion {since} or later, the config says {}",
                command.as_str(),
                config.cni_version
            ),
        ));
    }
    Ok(())
}

fn plan_check(env: &Env, stdin: &[u8]) -> Result<Call, CniError> {
    let config = config::parse(stdin)?;
    require_version(&config, Command::Check, "0.4.0")?;
    let (container_id, ifname, _) = env.require(Command::Check)?;
    let Some(prev) = &config.prev_result else {
        return Err(CniError::new(
            codes::INVALID_CONFIG,
            "no prevResult",
            "CHECK got no prevResult (the runtime must pass the ADD's result)",
        ));
    };
    // The pod's interface and host veth must still be what ADD saw.
    pod_network(prev, &ifname)?;
    let subject = format!("attachment ({container_id}, {ifname})");
    Ok(Call {
        command: Command::Check,
        config,
        request: Request::Check(Attachment {
            container_id,
            ifname,
        }),
        subject,
        warnings: Vec::new(),
    })
}

fn plan_status(stdin: &[u8]) -> Result<Call, CniError> {
    let config = config::parse(stdin)?;
    require_version(&config, Command::Status, "1.1.0")?;
    Ok(Call {
        command: Command::Status,
        config,
        request: Request::Status,
        subject: "status".into(),
        warnings: Vec::new(),
    })
}

fn plan_gc(stdin: &[u8]) -> Result<Call, CniError> {
    let config = config::parse(stdin)?;
    require_version(&config, Command::Gc, "1.1.0")?;
    let Some(valid) = config.valid_attachments.clone() else {
        return Err(CniError::new(
            codes::INVALID_CONFIG,
            "no cni.dev/valid-attachments",
            "GC got no cni.dev/valid-attachments (the runtime must list the attachments to keep)",
        ));
    };
    let subject = format!("gc keeping {} attachments", valid.len());
    Ok(Call {
        command: Command::Gc,
        config,
        request: Request::Gc { valid },
        subject,
        warnings: Vec::new(),
    })
}

/// DEL never fails (the spec's "best effort", and a runtime that cannot delete a sandbox is
/// stuck): problems become warnings. A config we cannot read falls back to the defaults, so a
/// conflist edited between ADD and DEL still reaches the agent.
fn plan_del(env: &Env, stdin: &[u8]) -> Plan {
    let mut warnings = Vec::new();
    let config = match config::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            warnings.push(format!(
                "DEL: ignoring a config we cannot use ({e}); using the defaults"
            ));
            config::parse(br#"{"cniVersion":"1.1.0"}"#).expect("the defaults parse")
        }
    };
    let (container_id, ifname) = match (&env.container_id, &env.ifname) {
        (Some(c), Some(i)) => (c.clone(), i.clone()),
        _ => {
            let e = env.require(Command::Del).unwrap_err();
            warnings.push(format!("DEL: nothing to unregister: {e}"));
            return Plan::Done(Outcome {
                stdout: String::new(),
                summary: "DEL skipped".into(),
                warnings,
                exit_code: 0,
            });
        }
    };
    let subject = format!("attachment ({container_id}, {ifname})");
    Plan::Call(Box::new(Call {
        command: Command::Del,
        config,
        request: Request::Del(Attachment {
            container_id,
            ifname,
        }),
        subject,
        warnings,
    }))
}

/// Turn the agent's answer (or why there was none) into the invocation's outcome.
pub fn finish(call: &Call, answer: Result<Response, ClientError>) -> Outcome {
    let mut outcome = finish_command(call, answer);
    let mut warnings = call.warnings.clone();
    warnings.append(&mut outcome.warnings);
    outcome.warnings = warnings;
    outcome
}

fn finish_command(call: &Call, answer: Result<Response, ClientError>) -> Outcome {
    let cmd = call.command.as_str();
    let version = call.config.cni_version.as_str();
    let subject = &call.subject;
    match call.command {
        Command::Add => finish_add(call, answer),
        Command::Del => match answer {
            Ok(r) if r.ok => Outcome::success(String::new(), format!("DEL {subject}: ok")),
            other => Outcome {
                stdout: String::new(),
                warnings: vec![format!(
                    "DEL {subject}: the agent did not confirm ({}); exiting 0 anyway (DEL is \
                     best effort; the agent drops stale pods itself)",
                    why(&other)
                )],
                exit_code: 0,
                summary: format!("DEL {subject}: not confirmed"),
            },
        },
        Command::Status => match answer {
            Ok(r) if r.ok => Outcome::success(String::new(), "STATUS: ok".into()),
            other => {
                let code = match &other {
                    Ok(Response {
                        code: Some(c @ (codes::NOT_AVAILABLE | codes::NOT_AVAILABLE_DEGRADED)),
                        ..
                    }) => *c,
                    _ => codes::NOT_AVAILABLE,
                };
                let e = CniError::new(
                    code,
                    "sluice agent not ready: pods cannot get their network policy",
                    why(&other),
                );
                Outcome::failure(&e, version, cmd)
            }
        },
        Command::Check | Command::Gc => match answer {
            Ok(r) if r.ok => Outcome::success(String::new(), format!("{cmd} {subject}: ok")),
            other => {
                let (code, msg) = match &other {
                    Ok(r) => (
                        r.code.unwrap_or(codes::AGENT_REFUSED),
                        format!("sluice agent reports a problem with {subject}"),
                    ),
                    Err(ClientError::Protocol { .. }) => (
                        codes::AGENT_PROTOCOL,
                        "bad answer from the sluice agent".to_string(),
                    ),
                    Err(ClientError::Unreachable { .. }) => {
                        (codes::TRY_AGAIN, "sluice agent not reachable".to_string())
                    }
                    Err(ClientError::Timeout { .. }) => (
                        codes::TRY_AGAIN,
                        "timed out waiting for the sluice agent".to_string(),
                    ),
                };
                Outcome::failure(&CniError::new(code, msg, why(&other)), version, cmd)
            }
        },
        Command::Version => unreachable!("VERSION never calls the agent"),
    }
}

fn finish_add(call: &Call, answer: Result<Response, ClientError>) -> Outcome {
    let subject = &call.subject;
    let prev = call
        .config
        .prev_result
        .as_ref()
        .expect("ADD is only planned with a prevResult");
    if matches!(&answer, Ok(r) if r.ok) {
        return Outcome::success(
            render_result(prev),
            format!("ADD {subject}: rules in place"),
        );
    }
    let (code, what) = match &answer {
        Ok(r) => (
            r.code.unwrap_or(codes::AGENT_REFUSED),
            "the sluice agent could not put the pod's network policy in place",
        ),
        Err(ClientError::Unreachable { .. }) => {
            (codes::TRY_AGAIN, "the sluice agent is not reachable")
        }
        Err(ClientError::Timeout { .. }) => (
            codes::TRY_AGAIN,
            "timed out waiting for the sluice agent to put the pod's network policy in place",
        ),
        Err(ClientError::Protocol { .. }) => {
            (codes::AGENT_PROTOCOL, "bad answer from the sluice agent")
        }
    };
    let detail = why(&answer);
    match call.config.fail_mode {
        FailMode::Closed => {
            let e = CniError::new(
                code,
                what,
                format!(
                    "{subject}: {detail}; failMode is closed: the pod does not start without \
                     its rules (the runtime retries)"
                ),
            );
            Outcome::failure(&e, &call.config.cni_version, "ADD")
        }
        FailMode::Open => Outcome {
            stdout: render_result(prev),
            warnings: vec![format!(
                "WARNING: failMode is open: {subject} starts WITHOUT confirmed network policy: \
                 {detail}"
            )],
            exit_code: 0,
            summary: format!(
                "ADD {subject}: started without confirmed rules (fail open): {detail}"
            ),
        },
    }
}

/// prevResult as our result: the same JSON value, every field kept.
pub fn render_result(prev: &Value) -> String {
    let mut s = serde_json::to_string(prev).expect("json values serialize");
    s.push('\n');
    s
}

/// Why an answer is not a plain ok, in words.
fn why(answer: &Result<Response, ClientError>) -> String {
    match answer {
        Ok(r) if r.ok => "ok".into(),
        Ok(r) => format!(
            "agent answered: {}{}",
            r.error.as_deref().unwrap_or("(no message)"),
            r.code.map(|c| format!(" (code {c})")).unwrap_or_default()
        ),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Env {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    const ADD_ENV: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/run/netns/p"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u1",
        ),
    ];

    fn prev() -> Value {
        json!({
            "cniVersion": "0.3.1",
            "interfaces": [
                {"name": "cni0", "mac": "aa:27:4c:fe:9b:70"},
                {"name": "veth5d6ee293", "mac": "da:4e:72:e7:63:77"},
                {"name": "eth0", "mac": "46:35:b6:39:78:a7", "sandbox": "/run/netns/p"}
            ],
            "ips": [{"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"}],
            "routes": [{"dst": "10.244.0.0/16"}, {"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
            "dns": {},
            "x-unknown": {"kept": [1, 2.5, null, "s"]}
        })
    }

    fn config(extra: Value) -> Vec<u8> {
        let mut c =
            json!({"cniVersion":"0.3.1","name":"cbr0","type":"sluice-cni","prevResult":prev()});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string().into_bytes()
    }

    fn call(plan: Plan) -> Call {
        match plan {
            Plan::Call(c) => *c,
            Plan::Done(o) => panic!("expected a call, got {o:?}"),
        }
    }

    fn done(plan: Plan) -> Outcome {
        match plan {
            Plan::Done(o) => o,
            Plan::Call(c) => panic!("expected done, got {c:?}"),
        }
    }

    fn error_json(o: &Outcome) -> Value {
        assert_ne!(o.exit_code, 0, "{o:?}");
        serde_json::from_str(&o.stdout).unwrap()
    }

    fn unreachable_err() -> ClientError {
        ClientError::Unreachable {
            socket: "/run/sluice/cni.sock".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }
    }

    fn timeout_err() -> ClientError {
        ClientError::Timeout {
            socket: "/run/sluice/cni.sock".into(),
            after: Duration::from_secs(10),
            stage: "waiting for the answer",
        }
    }

    #[test]
    fn add_builds_the_request() {
        let c = call(plan(&env(ADD_ENV), &config(json!({"timeout": "2s"}))));
        assert_eq!(
            c.request,
            Request::Add(AddRequest {
                container_id: "c1".into(),
                ifname: "eth0".into(),
                netns: "/run/netns/p".into(),
                namespace: "default".into(),
                pod: "web".into(),
                pod_uid: Some("u1".into()),
                ips: vec!["10.244.1.2".parse().unwrap()],
                host_veth: "veth5d6ee293".into(),
                timeout_ms: 2000,
            })
        );
        assert_eq!(c.subject, "pod default/web (c1, eth0)");
    }

    #[test]
    fn add_passes_prev_result_through() {
        let c = call(plan(&env(ADD_ENV), &config(json!({}))));
        let o = finish(&c, Ok(Response::ok()));
        assert_eq!(o.exit_code, 0);
        assert!(o.warnings.is_empty());
        let printed: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(
            printed,
            prev(),
            "semantically equal, unknown fields included"
        );
    }

    #[test]
    fn add_errors() {
        // no prevResult
        let no_prev = json!({"cniVersion":"0.3.1","name":"cbr0","type":"sluice-cni"}).to_string();
        let e = error_json(&done(plan(&env(ADD_ENV), no_prev.as_bytes())));
        assert_eq!(e["code"], 7);
        assert_eq!(e["cniVersion"], "0.3.1");
        assert!(e["details"]
            .as_str()
            .unwrap()
            .contains("chained after flannel"));
        // missing env
        let e = error_json(&done(plan(
            &env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")]),
            &config(json!({})),
        )));
        assert_eq!(e["code"], 4);
        assert!(e["msg"]
            .as_str()
            .unwrap()
            .contains("CNI_CONTAINERID, CNI_NETNS"));
        // no pod identity
        let mut no_pod = ADD_ENV.to_vec();
        no_pod[4] = ("CNI_ARGS", "K8S_POD_NAMESPACE=default");
        let e = error_json(&done(plan(&env(&no_pod), &config(json!({})))));
        assert_eq!(e["code"], 4);
        assert!(e["details"].as_str().unwrap().contains("K8S_POD_NAME"));
        // unknown field
        let e = error_json(&done(plan(
            &env(ADD_ENV),
            &config(json!({"bridge": "cni0"})),
        )));
        assert_eq!(e["code"], 7);
        assert!(e["details"].as_str().unwrap().contains("\"bridge\""));
        // unsupported version
        let e = error_json(&done(plan(
            &env(ADD_ENV),
            &config(json!({"cniVersion": "9.9.9"})),
        )));
        assert_eq!(e["code"], 1);
        assert_eq!(e["cniVersion"], "9.9.9");
        // not JSON
        let e = error_json(&done(plan(&env(ADD_ENV), b"{")));
        assert_eq!(e["code"], 6);
        assert_eq!(e["cniVersion"], "1.1.0");
    }

    #[test]
    fn add_fail_closed() {
        let c = call(plan(&env(ADD_ENV), &config(json!({}))));
        for (answer, code, needle) in [
            (Err(unreachable_err()), 11, "not reachable"),
            (Err(timeout_err()), 11, "timed out"),
            (
                Err(ClientError::Protocol {
                    socket: "s".into(),
                    detail: "garbage".into(),
                }),
                100,
                "bad answer",
            ),
            (Ok(Response::error(11, "not synced yet")), 11, "could not"),
            (
                Ok(Response {
                    ok: false,
                    code: None,
                    error: Some("no".into()),
                }),
                101,
                "could not",
            ),
        ] {
            let o = finish(&c, answer);
            let e = error_json(&o);
            assert_eq!(e["code"], code, "{o:?}");
            assert!(e["msg"].as_str().unwrap().contains(needle), "{e}");
            assert!(
                e["details"]
                    .as_str()
                    .unwrap()
                    .contains("failMode is closed"),
                "{e}"
            );
        }
    }

    #[test]
    fn add_fail_open() {
        let c = call(plan(&env(ADD_ENV), &config(json!({"failMode": "open"}))));
        for (answer, needle) in [
            (Err(unreachable_err()), "not reachable"),
            (Err(timeout_err()), "timed out"),
            (Ok(Response::error(11, "not synced yet")), "not synced yet"),
            (
                Err(ClientError::Protocol {
                    socket: "s".into(),
                    detail: "garbage".into(),
                }),
                "garbage",
            ),
        ] {
            let o = finish(&c, answer);
            assert_eq!(o.exit_code, 0);
            assert_eq!(serde_json::from_str::<Value>(&o.stdout).unwrap(), prev());
            assert_eq!(o.warnings.len(), 1);
            assert!(
                o.warnings[0].contains("failMode is open"),
                "{:?}",
                o.warnings
            );
            assert!(o.warnings[0].contains(needle), "{:?}", o.warnings);
        }
    }

    #[test]
    fn del_always_succeeds() {
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        let c = call(plan(&env(&del), &config(json!({}))));
        assert_eq!(
            c.request,
            Request::Del(Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            })
        );
        for answer in [
            Ok(Response::ok()),
            Ok(Response::error(3, "unknown")),
            Err(unreachable_err()),
            Err(timeout_err()),
        ] {
            let o = finish(&c, answer);
            assert_eq!(o.exit_code, 0, "{o:?}");
            assert_eq!(o.stdout, "");
        }
        // a config we cannot read: defaults, still a call
        let c = call(plan(&env(&del), b"{\"cniVersion\":\"1.1.0\",\"junk\":1}"));
        assert_eq!(c.config.agent_socket.to_str(), Some("/run/sluice/cni.sock"));
        // no container id: nothing to send, still exit 0
        let o = done(plan(&env(&[("CNI_COMMAND", "DEL")]), &config(json!({}))));
        assert_eq!(o.exit_code, 0);
        assert!(o.warnings[0].contains("CNI_CONTAINERID"));
    }

    #[test]
    fn check_status_gc() {
        let v11 = |extra: Value| {
            config(
                json!({"cniVersion": "1.1.0"})
                    .as_object()
                    .map(|o| {
                        let mut m = o.clone();
                        m.extend(extra.as_object().unwrap().clone());
                        Value::Object(m)
                    })
                    .unwrap(),
            )
        };
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "/run/netns/p"),
        ];
        let c = call(plan(&env(&check), &v11(json!({}))));
        assert_eq!(finish(&c, Ok(Response::ok())).exit_code, 0);
        let e = error_json(&finish(&c, Ok(Response::error(3, "unknown pod"))));
        assert_eq!(e["code"], 3);
        assert!(e["details"].as_str().unwrap().contains("unknown pod"));
        assert_eq!(error_json(&finish(&c, Err(unreachable_err())))["code"], 11);
        // CHECK needs 0.4.0+
        let e = error_json(&done(plan(&env(&check), &config(json!({})))));
        assert_eq!(e["code"], 1);

        let status = [("CNI_COMMAND", "STATUS")];
        let c = call(plan(&env(&status), &v11(json!({}))));
        assert_eq!(c.request, Request::Status);
        assert_eq!(finish(&c, Ok(Response::ok())).exit_code, 0);
        for answer in [
            Err(unreachable_err()),
            Err(timeout_err()),
            Ok(Response::error(11, "not synced")),
        ] {
            let e = error_json(&finish(&c, answer));
            assert_eq!(e["code"], 50);
        }
        assert_eq!(
            error_json(&finish(&c, Ok(Response::error(51, "x"))))["code"],
            51
        );

        let gc = [("CNI_COMMAND", "GC")];
        let c = call(plan(
            &env(&gc),
            &v11(
                json!({"cni.dev/valid-attachments": [{"containerID":"c1","ifname":"eth0"},{"containerID":"c2","ifname":"eth0"}]}),
            ),
        ));
        assert_eq!(
            c.request,
            Request::Gc {
                valid: vec![
                    Attachment {
                        container_id: "c1".into(),
                        ifname: "eth0".into()
                    },
                    Attachment {
                        container_id: "c2".into(),
                        ifname: "eth0".into()
                    },
                ]
            }
        );
        assert_eq!(finish(&c, Ok(Response::ok())).exit_code, 0);
        assert_eq!(
            error_json(&done(plan(&env(&gc), &v11(json!({})))))["code"],
            7
        );
        assert_eq!(
            error_json(&done(plan(&env(&gc), &config(json!({})))))["code"],
            1
        );
    }

    #[test]
    fn version_and_bad_commands() {
        let o = done(plan(
            &env(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"0.3.1"}"#,
        ));
        assert_eq!(o.exit_code, 0);
        let v: Value = serde_json::from_str(&o.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let o = done(plan(&env(&[("CNI_COMMAND", "VERSION")]), b""));
        assert_eq!(
            serde_json::from_str::<Value>(&o.stdout).unwrap()["cniVersion"],
            "1.1.0"
        );
        let e = error_json(&done(plan(&env(&[("CNI_COMMAND", "NOPE")]), b"")));
        assert_eq!(e["code"], 4);
    }
}
