//! Deployment files agree with each other and with the code: docker-compose.yml, the
//! Dockerfile, and the README's commands and configuration table checked against
//! src/config.rs. These tests read files only; they start no service.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

const SERVICE: &str = "strata";

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------
// docker-compose.yml

fn compose_service() -> (Value, Value) {
    let document: Value = serde_yaml_ng::from_str(&read("docker-compose.yml"))
        .expect("docker-compose.yml is valid YAML");
    let service = document["services"][SERVICE].clone();
    assert!(
        service.is_mapping(),
        "docker-compose.yml has no service named {SERVICE}"
    );
    (document, service)
}

/// `command` as a list of strings (the exec form; a shell string would hide the flags).
fn compose_command(service: &Value) -> Vec<String> {
    let command = service["command"]
        .as_sequence()
        .expect("the compose command is a list (exec form)");
    command
        .iter()
        .map(|item| {
            item.as_str()
                .expect("every command item is a string")
                .to_owned()
        })
        .collect()
}

/// The value given to `flag` in an argument list, as `--flag value` or `--flag=value`.
fn flag_value(args: &[String], flag: &str) -> Option<String> {
    let prefix = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).cloned()
        } else {
            arg.strip_prefix(&prefix).map(str::to_owned)
        }
    })
}

/// Container ports the service publishes, from the short (`"[ip:]host:container[/proto]"`)
/// or long (`{target: ...}`) syntax.
fn published_container_ports(service: &Value) -> Vec<u16> {
    let ports = service["ports"]
        .as_sequence()
        .expect("the service publishes ports");
    ports
        .iter()
        .map(|port| match port {
            Value::String(text) => {
                let without_protocol = text.split('/').next().unwrap_or_default();
                let container = without_protocol.rsplit(':').next().unwrap_or_default();
                container
                    .parse()
                    .unwrap_or_else(|_| panic!("cannot read the container port of {text:?}"))
            }
            Value::Number(number) => number
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .expect("a port number"),
            Value::Mapping(_) => port["target"]
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .expect("ports[].target is a port"),
            other => panic!("unexpected ports entry {other:?}"),
        })
        .collect()
}

/// `(source, target)` of every volume mount, from the short (`"source:target[:mode]"`)
/// or long (`{source, target}`) syntax.
fn volume_mounts(service: &Value) -> Vec<(String, String)> {
    let volumes = service["volumes"]
        .as_sequence()
        .expect("the service mounts volumes");
    volumes
        .iter()
        .map(|volume| match volume {
            Value::String(text) => {
                let mut parts = text.split(':');
                let source = parts.next().unwrap_or_default().to_owned();
                let target = parts
                    .next()
                    .unwrap_or_else(|| panic!("volume {text:?} has no target"))
                    .to_owned();
                (source, target)
            }
            Value::Mapping(_) => (
                volume["source"].as_str().unwrap_or_default().to_owned(),
                volume["target"]
                    .as_str()
                    .expect("volumes[].target is a path")
                    .to_owned(),
            ),
            other => panic!("unexpected volumes entry {other:?}"),
        })
        .collect()
}

#[test]
fn compose_publishes_the_port_the_service_listens_on_in_the_container() {
    let (_, service) = compose_service();
    let command = compose_command(&service);
    let listen = flag_value(&command, "--listen").expect("the compose command passes --listen");
    let listen: SocketAddr = listen
        .parse()
        .unwrap_or_else(|_| panic!("--listen {listen} is not an address"));
    assert!(
        listen.ip().is_unspecified(),
        "inside a container the service must listen on all interfaces (0.0.0.0), not {}",
        listen.ip()
    );
    let published = published_container_ports(&service);
    assert!(
        published.contains(&listen.port()),
        "compose publishes container ports {published:?} but the service listens on {}",
        listen.port()
    );
}

#[test]
fn compose_mounts_the_named_data_volume_at_the_data_dir() {
    let (document, service) = compose_service();
    let command = compose_command(&service);
    let data_dir =
        flag_value(&command, "--data-dir").expect("the compose command passes --data-dir");
    let mounts = volume_mounts(&service);
    let (source, _) = mounts
        .iter()
        .find(|(_, target)| target.trim_end_matches('/') == data_dir.trim_end_matches('/'))
        .unwrap_or_else(|| {
            panic!("no volume is mounted at the data dir {data_dir}; mounts: {mounts:?}")
        });
    assert!(
        document["volumes"].get(source.as_str()).is_some(),
        "the data volume {source} is not declared under the top-level volumes"
    );
}

// ---------------------------------------------------------------------------------
// Dockerfile

/// Instructions with continuation lines joined and comments dropped: `(KEYWORD, rest)`.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (current.is_empty() && trimmed.is_empty()) {
            continue;
        }
        if let Some(start) = trimmed.strip_suffix('\\') {
            current.push_str(start);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((current.as_str(), ""));
        instructions.push((keyword.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    instructions
}

/// The instructions of the last stage (the image that ships).
fn runtime_stage() -> Vec<(String, String)> {
    let instructions = dockerfile_instructions();
    let start = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .expect("the Dockerfile has a FROM");
    instructions[start..].to_vec()
}

/// An exec-form (JSON array) argument, as in `CMD ["serve", ...]`.
fn exec_form(keyword: &str, stage: &[(String, String)]) -> Vec<String> {
    let (_, text) = stage
        .iter()
        .rev()
        .find(|(k, _)| k == keyword)
        .unwrap_or_else(|| panic!("the runtime stage has no {keyword}"));
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("{keyword} {text} is not in exec form (a JSON array): {e}"))
}

#[test]
fn dockerfile_installs_qemu_utils_in_the_runtime_image() {
    let stage = runtime_stage();
    let installs_qemu = stage.iter().any(|(keyword, text)| {
        keyword == "RUN" && text.contains("apt-get install") && text.contains("qemu-utils")
    });
    assert!(
        installs_qemu,
        "the runtime stage must apt-get install qemu-utils (the service runs qemu-img)"
    );
}

#[test]
fn dockerfile_cmd_matches_the_compose_command() {
    let stage = runtime_stage();
    let (_, service) = compose_service();
    assert_eq!(
        exec_form("ENTRYPOINT", &stage),
        ["strata"],
        "the image's entrypoint is the strata binary"
    );
    assert_eq!(
        exec_form("CMD", &stage),
        compose_command(&service),
        "the Dockerfile CMD and the compose command must be the same, so both run the service alike"
    );
}

#[test]
fn dockerfile_exposes_the_listen_port_and_declares_the_data_dir_as_a_volume() {
    let stage = runtime_stage();
    let cmd = exec_form("CMD", &stage);
    let listen: SocketAddr = flag_value(&cmd, "--listen")
        .expect("CMD passes --listen")
        .parse()
        .expect("--listen is an address");
    let data_dir = flag_value(&cmd, "--data-dir").expect("CMD passes --data-dir");
    let exposed: Vec<&str> = stage
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, text)| text.split_whitespace())
        .collect();
    assert!(
        exposed
            .iter()
            .any(|port| port.split('/').next() == Some(listen.port().to_string().as_str())),
        "EXPOSE {exposed:?} does not include the listen port {}",
        listen.port()
    );
    let declares_volume = stage
        .iter()
        .any(|(k, text)| k == "VOLUME" && text.contains(data_dir.as_str()));
    assert!(
        declares_volume,
        "the runtime stage must declare the data dir {data_dir} as a VOLUME"
    );
    let user = stage
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, text)| text.as_str());
    assert!(
        matches!(user, Some(u) if u != "root" && u != "0" && !u.starts_with("0:")),
        "the service must not run as root in the image (USER is {user:?})"
    );
}

// ---------------------------------------------------------------------------------
// README against src/config.rs

/// A `#[arg(...)]` option of src/config.rs.
#[derive(Debug)]
struct ConfigFlag {
    /// The flag without its dashes, e.g. `data-dir`.
    long: String,
    env: Option<String>,
    /// `default_value = "..."` when the default is given as text.
    default_text: Option<String>,
    hidden: bool,
}

/// Split `long, env = "X", value_delimiter = ','` into `(key, value)` items, keeping
/// commas inside quotes and brackets.
fn attribute_items(inner: &str) -> Vec<(String, Option<String>)> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match (quote, c) {
            (Some(q), _) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '(' | '[' | '{') => depth += 1,
            (None, ')' | ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                items.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    items.push(current);
    items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((key, value)) => (
                key.trim().to_owned(),
                Some(value.trim().trim_matches('"').to_owned()),
            ),
            None => (item, None),
        })
        .collect()
}

/// Every option of `strata serve` (`ServeConfig`) declared with `#[arg(long ...)]`;
/// the flag is the field name with dashes unless `long = "..."` names it. Other
/// commands' options (`strata token`) are documented with the command.
fn config_flags() -> Vec<ConfigFlag> {
    let source = read("src/config.rs");
    let lines: Vec<&str> = source
        .lines()
        .map(str::trim)
        .skip_while(|line| !line.starts_with("pub struct ServeConfig"))
        .take_while(|line| *line != "}")
        .collect();
    assert!(!lines.is_empty(), "src/config.rs declares ServeConfig");
    let mut flags = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !lines[i].starts_with("#[arg(") {
            i += 1;
            continue;
        }
        let mut attribute = lines[i].to_owned();
        while !attribute.ends_with(")]") && i + 1 < lines.len() {
            i += 1;
            attribute.push(' ');
            attribute.push_str(lines[i]);
        }
        let inner = &attribute["#[arg(".len()..attribute.len() - ")]".len()];
        let items = attribute_items(inner);
        let field = lines[i + 1..]
            .iter()
            .find(|line| !line.starts_with("#[") && !line.starts_with("//") && line.contains(':'))
            .and_then(|line| line.trim_start_matches("pub ").split(':').next())
            .map(|name| name.trim().to_owned())
            .expect("an #[arg] attribute is followed by its field");
        let value_of = |key: &str| items.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        if let Some(long) = value_of("long") {
            flags.push(ConfigFlag {
                long: long.unwrap_or_else(|| field.replace('_', "-")),
                env: value_of("env").flatten(),
                default_text: value_of("default_value").flatten(),
                hidden: value_of("hide").flatten().as_deref() == Some("true"),
            });
        }
        i += 1;
    }
    flags
}

/// The rows of the README's configuration table: lines starting `| \`--`.
fn readme_flag_rows(readme: &str) -> Vec<&str> {
    readme
        .lines()
        .filter(|line| line.trim_start().starts_with("| `--"))
        .collect()
}

#[test]
fn config_flags_are_read_from_the_source() {
    let flags = config_flags();
    let names: Vec<&str> = flags.iter().map(|f| f.long.as_str()).collect();
    for expected in ["listen", "data-dir", "cors-origin", "fault"] {
        assert!(
            names.contains(&expected),
            "parsing src/config.rs missed --{expected} (found {names:?})"
        );
    }
    assert!(
        flags.iter().any(|f| f.long == "fault" && f.hidden),
        "--fault is hidden"
    );
}

#[test]
fn readme_gives_the_two_contract_commands() {
    let readme = read("README.md");
    for command in ["cargo run --release -- serve", "cargo test"] {
        let as_a_line = readme.lines().any(|line| line.trim() == command);
        assert!(
            as_a_line,
            "the README must give `{command}` on a line of its own"
        );
    }
}

#[test]
fn readme_documents_every_configuration_flag_with_its_environment_variable() {
    let readme = read("README.md");
    let rows = readme_flag_rows(&readme);
    for flag in config_flags().iter().filter(|f| !f.hidden) {
        let name = format!("`--{}`", flag.long);
        let row = rows
            .iter()
            .find(|row| row.contains(&name))
            .unwrap_or_else(|| panic!("the README's configuration table has no row for {name}"));
        if let Some(env) = &flag.env {
            assert!(
                row.contains(&format!("`{env}`")),
                "the README row of {name} must name {env}: {row}"
            );
        }
        if let Some(default) = &flag.default_text {
            assert!(
                row.contains(&format!("`{default}`")),
                "the README row of {name} must give the default {default}: {row}"
            );
        }
    }
}

#[test]
fn readme_configuration_table_names_only_flags_that_exist() {
    let readme = read("README.md");
    let flags = config_flags();
    for row in readme_flag_rows(&readme) {
        let name = row
            .trim_start()
            .trim_start_matches("| `--")
            .split('`')
            .next()
            .unwrap_or_default();
        let flag = flags.iter().find(|f| f.long == name);
        assert!(
            flag.is_some_and(|f| !f.hidden),
            "the README documents --{name}, which src/config.rs does not offer"
        );
    }
}

#[test]
fn compose_sets_only_environment_variables_the_binary_reads() {
    let (_, service) = compose_service();
    let flags = config_flags();
    let environment = service["environment"]
        .as_mapping()
        .expect("environment is a mapping");
    let mounts = volume_mounts(&service);
    for (key, value) in environment {
        let key = key.as_str().expect("environment keys are strings");
        if key == "STRATA_LOG" {
            continue; // read by the tracing filter, not a flag
        }
        assert!(
            flags
                .iter()
                .any(|f| f.env.as_deref() == Some(key) && !f.hidden),
            "compose sets {key}, which no flag of src/config.rs reads"
        );
        if key == "STRATA_IMPORT_DIR" {
            let dir = value.as_str().expect("a path");
            assert!(
                mounts.iter().any(|(_, target)| target == dir),
                "STRATA_IMPORT_DIR {dir} is not a mounted path: {mounts:?}"
            );
        }
    }
}

/// Both the image and the compose service probe readiness (`/readyz`: 503 while
/// recovery runs) on the port the service listens on, with a probe the image has.
#[test]
fn the_image_and_the_compose_service_probe_readyz_with_curl_from_the_image() {
    let stage = runtime_stage();
    let installs = stage
        .iter()
        .filter(|(keyword, _)| keyword == "RUN")
        .any(|(_, run)| run.contains("apt-get install") && run.contains(" curl"));
    assert!(installs, "the runtime image installs curl for the probe");
    let (_, check) = stage
        .iter()
        .find(|(keyword, _)| keyword == "HEALTHCHECK")
        .expect("the Dockerfile has a HEALTHCHECK");
    let probe = check
        .split_once("CMD")
        .expect("HEALTHCHECK ... CMD [...]")
        .1;
    let probe: Vec<String> = serde_json::from_str(probe.trim()).expect("an exec-form probe");
    let (_, service) = compose_service();
    let test: Vec<String> = service["healthcheck"]["test"]
        .as_sequence()
        .expect("the compose service has a healthcheck test list")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(test[0], "CMD");
    assert_eq!(
        test[1..],
        probe[..],
        "the compose file and the image probe alike"
    );
    assert_eq!(probe[0], "curl");
    let port = compose_command(&service)
        .iter()
        .find_map(|a| a.strip_prefix("0.0.0.0:").map(str::to_owned))
        .expect("the compose command listens on 0.0.0.0:PORT");
    assert_eq!(
        probe.last().unwrap(),
        &format!("http://127.0.0.1:{port}/readyz")
    );
}

/// The build stage copies every directory the binary embeds (`#[folder = ...]` of
/// rust-embed: the dashboard's build), or the image would not build.
#[test]
fn dockerfile_build_stage_copies_what_the_binary_embeds() {
    let instructions = dockerfile_instructions();
    let runtime = instructions
        .iter()
        .rposition(|(keyword, _)| keyword == "FROM")
        .unwrap();
    let copied: Vec<String> = instructions[..runtime]
        .iter()
        .filter(|(keyword, text)| keyword == "COPY" && !text.starts_with("--from"))
        .flat_map(|(_, text)| {
            let parts: Vec<&str> = text.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|p| p.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut embedded = Vec::new();
    let mut pending = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/src"
    ))];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for line in text.lines() {
                    if let Some(rest) = line.trim().strip_prefix("#[folder = \"") {
                        embedded.push(
                            rest.split('"')
                                .next()
                                .unwrap()
                                .trim_end_matches('/')
                                .to_owned(),
                        );
                    }
                }
            }
        }
    }
    assert!(
        !embedded.is_empty(),
        "the dashboard is embedded from a folder"
    );
    for folder in embedded {
        assert!(
            copied
                .iter()
                .any(|c| folder == *c || folder.starts_with(&format!("{c}/"))),
            "the build stage does not COPY {folder}, which the binary embeds: {copied:?}"
        );
    }
}
