//! `docker-compose.yml` is valid (`docker-compose config`, offline: no Docker engine runs here)
//! and matches the README's Deploying section: the same services, images, published ports and
//! worker environment. Its optional `cluster` profile (three RabbitMQ nodes) and the override that
//! points the worker at them are valid too. Needs Debian's `docker-compose` (which brings
//! python3-yaml, used here to read its output); `scripts/test` installs it.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

use crate::support::repo;

const README: &str = include_str!("../../README.md");

/// `docker-compose config` of docker-compose.yml with `env`: its normalized file as JSON, or its
/// error text. Docker-compose 1.29 lists every service in it, those of a profile too.
fn compose_config(env: &[(&str, &str)]) -> Result<Value, String> {
    compose_config_of(&["docker-compose.yml"], &[], env)
}

/// `docker-compose config` of `files` (merged in order) with `profiles` enabled.
fn compose_config_of(files: &[&str], profiles: &[&str], env: &[(&str, &str)]) -> Result<Value, String> {
    let mut args = Vec::new();
    for file in files {
        args.extend(["--file", file]);
    }
    for profile in profiles {
        args.extend(["--profile", profile]);
    }
    args.push("config");
    let output = Command::new("docker-compose")
        .args(args)
        .current_dir(repo())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .output()
        .expect("docker-compose is installed (scripts/test installs Debian's package)");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let mut to_json = Command::new("python3")
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    std::io::Write::write_all(&mut to_json.stdin.take().unwrap(), &output.stdout).unwrap();
    let json = to_json.wait_with_output().unwrap();
    assert!(json.status.success(), "python3-yaml (a docker-compose dependency) could not read the output");
    Ok(serde_json::from_slice(&json.stdout).unwrap())
}

/// The rows of the README's Deploying table whose header starts with `first_header`, as cells.
fn deploying_table(first_header: &str) -> Vec<Vec<String>> {
    let section = README.split("\n## Deploying\n").nth(1).expect("the README has a Deploying section");
    let section = section.split("\n## ").next().unwrap();
    let mut lines = section.lines().skip_while(|l| !l.starts_with(&format!("| {first_header} |")));
    lines.next().expect("the table is there");
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split(" | ").map(|c| c.trim().to_owned()).collect())
        .collect()
}

/// The backticked names in a README cell.
fn quoted(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default()
}

/// The services `docker-compose up` starts: those without a profile.
fn default_services(services: &Value) -> BTreeSet<String> {
    keys(services).into_iter().filter(|name| services[name]["profiles"].is_null()).collect()
}

const SECRETS: &[(&str, &str)] =
    &[("MCP_WORKER_ENCRYPTION_KEY", "validation-only"), ("MCP_WORKER_SERVICE_KEY", "validation-only")];

#[test]
fn the_compose_file_is_valid_and_refuses_to_start_without_its_secrets() {
    compose_config(SECRETS).expect("docker-compose config passes");
    let missing = compose_config(&SECRETS[1..]).expect_err("the encryption key is required");
    assert!(missing.contains("MCP_WORKER_ENCRYPTION_KEY"), "{missing}");
    let missing = compose_config(&SECRETS[..1]).expect_err("the service key is required");
    assert!(missing.contains("MCP_WORKER_SERVICE_KEY"), "{missing}");
}

#[test]
fn services_images_and_ports_are_the_ones_the_readme_documents() {
    let config = compose_config(SECRETS).expect("docker-compose config passes");
    let services = &config["services"];
    let rows = deploying_table("service");
    let documented: BTreeSet<String> = rows.iter().map(|row| quoted(&row[0]).join("")).collect();
    assert_eq!(documented, default_services(services), "the README's services are the compose file's");

    for row in &rows {
        let name = quoted(&row[0]).join("");
        let service = &services[&name];
        let source = match (&service["image"], &service["build"]) {
            (Value::String(image), _) => image.clone(),
            (_, build) => build["dockerfile"].as_str().unwrap_or("Dockerfile").to_owned(),
        };
        assert!(quoted(&row[1]).contains(&source), "{name}: the README says {:?}, the file {source}", row[1]);
        let ports: BTreeSet<String> = service["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| p.as_str().unwrap().trim_end_matches("/tcp").to_owned())
            .collect();
        let documented: BTreeSet<String> = quoted(&row[2]).into_iter().collect();
        assert_eq!(documented, ports, "{name}: published ports");
        if let Some(command) = service["command"].as_array() {
            let command = command.iter().map(|c| c.as_str().unwrap()).collect::<Vec<_>>().join(" ");
            assert!(row[1].contains(&format!("command `{command}`")), "{name}: command {command}");
        }
        for variable in keys(&service["environment"]).iter().filter(|v| v.starts_with("RABBITMQ_")) {
            assert!(row[3].contains(variable.as_str()), "{name}: {variable} is not documented");
        }
        assert!(!service["healthcheck"].is_null() || !["mongodb", "rabbitmq"].contains(&name.as_str()));
    }
}

#[test]
fn the_worker_environment_is_the_one_the_readme_documents() {
    let config = compose_config(SECRETS).expect("docker-compose config passes");
    let worker = keys(&config["services"]["worker"]["environment"]);
    assert_eq!(worker, keys(&config["services"]["migrate"]["environment"]), "migrate runs with the worker's settings");
    let documented: BTreeSet<String> =
        deploying_table("variable").iter().flat_map(|row| quoted(&row[0])).filter(|v| v.starts_with("MCP_")).collect();
    assert_eq!(documented, worker, "the README's worker variables are the compose file's");
}

const CLUSTER_OVERRIDE: &str = "config/cluster-compose/worker.override.yml";
const CLUSTER_CONF: &str = "config/cluster-compose/rabbitmq.conf";

#[test]
fn the_cluster_profile_forms_one_cluster_and_the_override_gives_the_worker_every_node() {
    let mut env = SECRETS.to_vec();
    env.extend([("RABBITMQ_CLUSTER_USER", "alice"), ("RABBITMQ_CLUSTER_PASS", "s3cret")]);
    let config = compose_config_of(&["docker-compose.yml", CLUSTER_OVERRIDE], &["cluster"], &env)
        .expect("docker-compose config passes with the cluster profile and the worker override");
    let services = &config["services"];
    let nodes: Vec<String> = keys(services)
        .into_iter()
        .filter(|name| services[name]["profiles"] == serde_json::json!(["cluster"]))
        .collect();
    assert_eq!(nodes, ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"], "the cluster profile's services");

    let conf = std::fs::read_to_string(repo().join(CLUSTER_CONF)).unwrap();
    let settings: Vec<(&str, &str)> = conf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once(" = ").unwrap_or_else(|| panic!("{CLUSTER_CONF}: not `key = value`: {l}")))
        .collect();
    assert!(settings.contains(&("cluster_formation.peer_discovery_backend", "classic_config")), "{conf}");
    let peers: BTreeSet<&str> = settings
        .iter()
        .filter(|(key, _)| key.starts_with("cluster_formation.classic_config.nodes."))
        .map(|(_, node)| *node)
        .collect();

    let mut cookies = BTreeSet::new();
    for name in &nodes {
        let node = &services[name];
        // Node names are rabbit@<hostname>; the peers reach each other by service name.
        assert_eq!(node["hostname"], name.as_str(), "{name}: hostname");
        assert!(peers.contains(format!("rabbit@{name}").as_str()), "{CLUSTER_CONF} lists rabbit@{name}: {peers:?}");
        assert!(node["image"].as_str().unwrap().starts_with("rabbitmq:3"), "{name}: image");
        assert!(!node["healthcheck"].is_null(), "{name}: healthcheck");
        let volumes: Vec<&str> = node["volumes"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let mounted = format!("{CLUSTER_CONF}:/etc/rabbitmq/conf.d/20-cluster.conf:ro");
        assert!(volumes.iter().any(|v| v.ends_with(&mounted)), "{name}: mounts {CLUSTER_CONF} read-only: {volumes:?}");
        for port in node["ports"].as_array().into_iter().flatten() {
            assert!(port.as_str().unwrap().starts_with("127.0.0.1:"), "{name}: {port} is published beyond loopback");
        }
        let environment = &node["environment"];
        assert_eq!(environment["RABBITMQ_DEFAULT_USER"], "alice", "{name}: user from RABBITMQ_CLUSTER_USER");
        assert_eq!(environment["RABBITMQ_DEFAULT_PASS"], "s3cret", "{name}: password from RABBITMQ_CLUSTER_PASS");
        cookies.insert(environment["RABBITMQ_ERLANG_COOKIE"].as_str().expect("an Erlang cookie").to_owned());
    }
    assert_eq!(peers.len(), nodes.len(), "{CLUSTER_CONF} lists the profile's nodes and no others: {peers:?}");
    assert_eq!(cookies.len(), 1, "the nodes share one Erlang cookie");

    let expected: Vec<String> = nodes.iter().map(|name| format!("amqp://alice:s3cret@{name}:5672/%2f")).collect();
    for role in ["worker", "migrate"] {
        let urls =
            services[role]["environment"]["MCP_WORKER_AMQP__URLS"].as_str().expect("the override sets amqp.urls");
        let urls: Vec<String> = serde_json::from_str(urls).expect("MCP_WORKER_AMQP__URLS is a JSON list");
        assert_eq!(urls, expected, "{role}: every node, with the cluster's user");
    }
    for name in &nodes {
        assert_eq!(services["worker"]["depends_on"][name]["condition"], "service_healthy", "worker waits for {name}");
    }
}
