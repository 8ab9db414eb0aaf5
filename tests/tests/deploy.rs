//! `deploy/`: no cluster, no systemd and no registry run here, so every manifest is parsed
//! and the fields that make it work are checked against each other and against the binaries
//! (flags that exist, ports that match, the capabilities capture needs and no more).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use serde_yaml::Value;
use tcpkit_tests::bin;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(deploy(path)).unwrap_or_else(|e| panic!("deploy/{path}: {e}"))
}

/// Every document of a YAML file.
fn documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{v:?} is not a list"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// The long flags a binary's --help lists.
fn long_flags(program: &str) -> Vec<String> {
    let out = std::process::Command::new(bin(program))
        .arg("--help")
        .output()
        .expect("--help");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.trim_end_matches([',', '=', '.']).to_owned())
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .collect()
}

/// `--name=value` arguments as a map, each checked to be a flag of `program`.
fn flag_map(program: &str, args: &[String]) -> BTreeMap<String, String> {
    let known = long_flags(program);
    args.iter()
        .map(|a| {
            let (name, value) = a
                .strip_prefix("--")
                .and_then(|a| a.split_once('='))
                .unwrap_or_else(|| panic!("{a}: expected --name=value"));
            assert!(known.iter().any(|k| k == name), "{program} has no --{name}");
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

#[test]
fn kubernetes_agents_reach_the_aggregator_with_the_token() {
    let aggregator = documents("k8s/aggregator.yaml");
    let agents = documents("k8s/agent.yaml");
    let secret = kind(&documents("k8s/token-secret.yaml"), "Secret").clone();
    let namespace = kind(&documents("k8s/namespace.yaml"), "Namespace")["metadata"]["name"].clone();

    let service = kind(&aggregator, "Service");
    let statefulset = kind(&aggregator, "StatefulSet");
    let daemonset = kind(&agents, "DaemonSet");
    for object in [service, statefulset, daemonset, &secret] {
        assert_eq!(object["metadata"]["namespace"], namespace);
    }

    // The aggregator: a StatefulSet behind its Service, the database on the claimed volume.
    let sts = &statefulset["spec"];
    assert_eq!(sts["serviceName"], service["metadata"]["name"]);
    assert_eq!(sts["replicas"], 1, "one writer per SQLite file");
    let pod_labels = &sts["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_mapping().expect("selector") {
        assert_eq!(
            &pod_labels[key], value,
            "the Service selects the aggregator's pods"
        );
    }
    assert_eq!(sts["selector"]["matchLabels"], service["spec"]["selector"]);
    let container = &sts["template"]["spec"]["containers"][0];
    let flags = flag_map("tcpkit-aggregator", &strings(&container["args"]));
    let grpc_port = container["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("a grpc port")["containerPort"]
        .as_u64()
        .expect("a number");
    assert!(flags["listen"].ends_with(&format!(":{grpc_port}")));
    let claim = &sts["volumeClaimTemplates"][0];
    let data_mount = container["volumeMounts"]
        .as_sequence()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == claim["metadata"]["name"])
        .expect("the claimed volume is mounted");
    let db_dir = data_mount["mountPath"].as_str().expect("path");
    assert!(
        flags["db"].starts_with(&format!("{db_dir}/")),
        "the database is on the volume"
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"][0],
        "ALL"
    );
    assert_eq!(
        sts["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    let service_port = service["spec"]["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "grpc")
        .expect("grpc service port")["port"]
        .as_u64()
        .expect("a number");

    // The agents: every node, its network, capture capabilities only, the Service's address.
    let ds = &daemonset["spec"]["template"]["spec"];
    assert_eq!(ds["hostNetwork"], true);
    assert_eq!(
        ds["dnsPolicy"], "ClusterFirstWithHostNet",
        "host network still resolves the Service"
    );
    let agent = &ds["containers"][0];
    let caps = &agent["securityContext"]["capabilities"];
    assert_eq!(strings(&caps["drop"]), ["ALL"]);
    assert_eq!(
        strings(&caps["add"]),
        ["NET_RAW", "NET_ADMIN", "SETUID", "SETGID"]
    );
    assert_eq!(agent["securityContext"]["allowPrivilegeEscalation"], false);
    // The image's entrypoint (`tcpkit --user nobody`) stays: no command replaces it.
    assert!(
        agent["command"].is_null(),
        "command: would drop --user nobody"
    );
    let dockerfile = read("docker/agent.Dockerfile");
    assert!(dockerfile.contains(r#"ENTRYPOINT ["/usr/local/bin/tcpkit", "--user", "nobody"]"#));
    // Probed on its metrics endpoint, its ports declared.
    let metrics_port = agent["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a metrics port")["containerPort"]
        .as_u64()
        .expect("a number");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"], "/metrics", "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(
        service["spec"]["clusterIP"], "None",
        "a headless Service for the StatefulSet"
    );
    for image in [&agent["image"], &container["image"]] {
        assert!(
            image.as_str().unwrap().starts_with("registry.example.com/"),
            "{image:?}"
        );
    }
    let flags = flag_map("tcpkit", &strings(&agent["args"]));
    assert!(flags["metrics-listen"].ends_with(&format!(":{metrics_port}")));
    let expected_url = format!(
        "http://{}.{}.svc:{service_port}",
        service["metadata"]["name"].as_str().unwrap(),
        namespace.as_str().unwrap()
    );
    assert_eq!(flags["aggregator"], expected_url);
    assert!(agent["memory"].is_null() && !agent["resources"]["limits"]["memory"].is_null());

    // The token: both read the Secret's key from where their --token-file points.
    let key = secret["stringData"]
        .as_mapping()
        .expect("data")
        .keys()
        .next()
        .expect("a key");
    for (pod, container, program) in [
        (ds, agent, "tcpkit"),
        (&sts["template"]["spec"], container, "tcpkit-aggregator"),
    ] {
        let flags = flag_map(program, &strings(&container["args"]));
        let volume = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["secret"]["secretName"] == secret["metadata"]["name"])
            .expect("the token Secret is a volume");
        let mount = container["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("and it is mounted");
        let path = format!(
            "{}/{}",
            mount["mountPath"].as_str().unwrap(),
            key.as_str().unwrap()
        );
        assert_eq!(flags["token-file"], path, "{program}");
    }
}

/// `[Service]` settings of a unit file (a key given twice keeps both values).
fn unit(path: &str) -> BTreeMap<String, Vec<String>> {
    let mut section = String::new();
    let mut settings: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in read(path).lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{path}: {line}"));
        settings
            .entry(format!("{section}.{key}"))
            .or_default()
            .push(value.to_owned());
    }
    settings
}

#[test]
fn systemd_units_are_hardened_and_run_the_binaries() {
    for (path, program, config) in [
        ("systemd/tcpkit-agent.service", "tcpkit", "agent.toml"),
        (
            "systemd/tcpkit-aggregator.service",
            "tcpkit-aggregator",
            "aggregator.toml",
        ),
    ] {
        let u = unit(path);
        let one = |key: &str| {
            u.get(key)
                .and_then(|v| v.last())
                .cloned()
                .unwrap_or_else(|| panic!("{path}: no {key}"))
        };
        let exec = one("Service.ExecStart");
        let mut words = exec.split_whitespace();
        assert_eq!(
            words.next(),
            Some(format!("/usr/local/bin/{program}").as_str())
        );
        let known = long_flags(program);
        for flag in words.filter_map(|w| w.strip_prefix("--")) {
            assert!(
                known.iter().any(|k| k == flag),
                "{path}: {program} has no --{flag}"
            );
        }
        assert!(
            exec.contains(&format!("--config /etc/tcpkit/{config}")),
            "{path}"
        );
        assert!(
            exec.contains("--token-file ${CREDENTIALS_DIRECTORY}/token"),
            "{path}"
        );
        assert!(u["Service.LoadCredential"]
            .iter()
            .any(|c| c == "token:/etc/tcpkit/token"));
        for (key, value) in [
            ("Service.ProtectSystem", "strict"),
            ("Service.NoNewPrivileges", "yes"),
            ("Service.DynamicUser", "yes"),
            ("Service.ProtectHome", "yes"),
            ("Service.PrivateTmp", "yes"),
            ("Install.WantedBy", "multi-user.target"),
        ] {
            assert_eq!(one(key), value, "{path}: {key}");
        }
        assert!(!one("Service.StateDirectory").is_empty());
    }
    let agent = unit("systemd/tcpkit-agent.service");
    assert_eq!(
        agent["Service.CapabilityBoundingSet"],
        ["CAP_NET_RAW CAP_NET_ADMIN"]
    );
    assert_eq!(
        agent["Service.AmbientCapabilities"],
        ["CAP_NET_RAW CAP_NET_ADMIN"]
    );
    let aggregator = unit("systemd/tcpkit-aggregator.service");
    assert_eq!(
        aggregator["Service.CapabilityBoundingSet"],
        [""],
        "the aggregator needs none"
    );
    // Its database is in its state directory.
    let config: toml::Table = read("config/aggregator.toml").parse().expect("TOML");
    let state = format!("/var/lib/{}/", aggregator["Service.StateDirectory"][0]);
    assert!(config["db"].as_str().expect("db").starts_with(&state));
}

#[test]
fn example_configs_parse_with_the_real_parsers() {
    let path = deploy("config/agent.toml");
    let argv = vec![
        "tcpkit".into(),
        "--config".into(),
        path.clone().into_os_string(),
    ];
    let argv = tcpkit_ops::config::with_config_file(&tcpkit::cli::Args::command(), argv)
        .expect("agent.toml");
    let args = tcpkit::cli::Args::try_parse_from(argv).expect("agent.toml parses");
    assert_eq!(args.port_numbers(), [6379, 11211, 53]);
    assert!(args.aggregator.is_some() && args.client.token_file.is_some());
    // The aggregator's Args live in its binary: every key must be one of its flags.
    let known = long_flags("tcpkit-aggregator");
    let config: toml::Table = read("config/aggregator.toml").parse().expect("TOML");
    for key in config.keys() {
        assert!(known.contains(key), "tcpkit-aggregator has no --{key}");
    }
}

#[test]
fn compose_runs_the_fleet_demo_and_dockerfiles_build_both_images() {
    let compose = &documents("compose.yaml")[0];
    let services = &compose["services"];
    for name in ["aggregator", "redis", "agent", "loadgen"] {
        assert!(!services[name].is_null(), "compose has no {name}");
    }
    let agent = &services["agent"];
    assert_eq!(
        agent["network_mode"], "service:redis",
        "the agent sees Redis' traffic"
    );
    assert_eq!(strings(&agent["cap_drop"]), ["ALL"]);
    assert!(strings(&agent["cap_add"]).contains(&"NET_RAW".to_owned()));
    let args = strings(&agent["command"]);
    let after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args[i + 1].clone())
            .unwrap_or_else(|| panic!("no {flag}"))
    };
    assert_eq!(after("--aggregator"), "http://aggregator:50051");
    assert_eq!(after("--token-file"), "/run/secrets/token");
    let aggregator_args = strings(&services["aggregator"]["command"]);
    assert!(aggregator_args
        .windows(2)
        .any(|w| w == ["--token-file", "/run/secrets/token"]));
    assert!(aggregator_args
        .windows(2)
        .any(|w| w[0] == "--listen" && w[1].ends_with(":50051")));
    let known = long_flags("tcpkit");
    for flag in args.iter().filter_map(|a| a.strip_prefix("--")) {
        assert!(known.iter().any(|k| k == flag), "tcpkit has no --{flag}");
    }

    for (service, binaries) in [
        ("agent", &["tcpkit"][..]),
        ("aggregator", &["tcpkit-aggregator", "tcpkit-query"]),
    ] {
        let dockerfile = services[service]["build"]["dockerfile"]
            .as_str()
            .expect("dockerfile");
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(dockerfile),
        )
        .expect("the Dockerfile exists");
        let stages: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
        assert_eq!(
            stages.len(),
            2,
            "{dockerfile}: a build stage and a runtime stage"
        );
        assert!(stages[0].ends_with(" AS build"), "{dockerfile}");
        for binary in binaries {
            assert!(
                text.contains(&format!("--bin {binary}")),
                "{dockerfile} builds {binary}"
            );
            assert!(
                text.contains(&format!("/src/target/release/{binary}")),
                "{dockerfile} copies {binary}"
            );
        }
    }
}

#[test]
fn logrotate_rotates_the_configured_log_and_signals_the_unit() {
    let rules = read("logrotate/tcpkit");
    let config: toml::Value = toml::from_str(&read("config/agent.toml")).expect("agent.toml");
    let log = config["log"].as_str().expect("the agent's log");
    let dir = log.rsplit_once('/').expect("a path").0;
    assert!(rules.contains(&format!("{dir}/*.log {{")), "{rules}");
    assert!(read("systemd/tcpkit-agent.service").contains("LogsDirectory=tcpkit"));
    assert!(dir.ends_with("/tcpkit"));
    assert!(
        rules.contains("systemctl kill --kill-whom=main --signal=HUP tcpkit-agent.service"),
        "{rules}"
    );
    assert!(
        rules
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .all(|l| !l.contains("copytruncate")),
        "the agent reopens: no copy needed"
    );
}

/// `demo.sh` shows what the tool is for: latency (the slow log and percentiles) and the
/// fleet, in well under a minute once built.
#[test]
fn the_demo_shows_latency_and_the_fleet() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = tcpkit_tests::tcpkit_bin()
        .parent()
        .expect("a directory")
        .to_path_buf();
    let started = std::time::Instant::now();
    let out = std::process::Command::new("bash")
        .arg(root.join("demo.sh"))
        .env("DEMO_BIN", &bin_dir)
        .output()
        .expect("run demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    for shown in [
        "| 100.310 ms | DEBUG SLEEP 0.1",
        "p50 18.048 ms, p90 50.432 ms, p99 100.310 ms",
        "\nweb-1  10002 ",
        "\nall    10012 ",
        "[web-2] ",
        "\nweb-2  stale ",
    ] {
        assert!(stdout.contains(shown), "{shown:?} not in {stdout}");
    }
}

/// The ClickHouse variant: stateless aggregators, several of them, on one store that the
/// aggregator's own parser takes, with the password and the cluster where they are looked for.
#[test]
fn the_clickhouse_variant_shares_one_store_between_replicas() {
    use tcpkit_aggregator::store::Spec;
    let docs = documents("k8s/aggregator-clickhouse.yaml");
    let service = kind(&docs, "Service");
    let deployment = kind(&docs, "Deployment");
    let plain = kind(&documents("k8s/aggregator.yaml"), "Service").clone();
    assert_eq!(
        service["metadata"], plain["metadata"],
        "agents reach either variant by the same name"
    );
    assert!(
        service["spec"]["clusterIP"].is_null(),
        "a load-balanced Service, not a headless one"
    );
    let spec = &deployment["spec"];
    assert!(spec["replicas"].as_u64().expect("replicas") >= 2);
    assert_eq!(spec["selector"]["matchLabels"], service["spec"]["selector"]);
    let pod = &spec["template"]["spec"];
    let container = &pod["containers"][0];
    let flags = flag_map("tcpkit-aggregator", &strings(&container["args"]));
    assert!(!flags.contains_key("db"));
    let Ok(Spec::ClickHouse(store)) = Spec::parse(&flags["store"]) else {
        panic!("--store {} is not a ClickHouse store", flags["store"]);
    };
    assert!(
        store.hosts.len() >= 2,
        "every node listed: {:?}",
        store.hosts
    );
    let cluster = &flags["clickhouse-cluster"];
    let servers = read("clickhouse/remote-servers.xml");
    assert!(
        servers.contains(&format!("<{cluster}>")),
        "remote-servers.xml defines {cluster}"
    );
    assert!(read("clickhouse/users.xml").contains(&format!("<{}>", store.user)));
    // Each secret file is read where the flag points.
    for (flag, secret) in [
        ("store-password-file", "tcpkit-clickhouse"),
        ("token-file", "tcpkit-token"),
    ] {
        let volume = pod["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["secret"]["secretName"] == secret)
            .unwrap_or_else(|| panic!("the Secret {secret} is a volume"));
        let mount = container["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("and it is mounted");
        let dir = mount["mountPath"].as_str().expect("path");
        assert!(flags[flag].starts_with(&format!("{dir}/")), "--{flag}");
    }

    let config: toml::Table = read("config/aggregator-clickhouse.toml")
        .parse()
        .expect("TOML");
    let known = long_flags("tcpkit-aggregator");
    for key in config.keys() {
        assert!(known.contains(key), "tcpkit-aggregator has no --{key}");
    }
    assert!(Spec::parse(config["store"].as_str().expect("store")).is_ok());

    let compose = &documents("compose-clickhouse.yaml")[0];
    let services = &compose["services"];
    for name in ["clickhouse", "aggregator", "redis", "agent", "loadgen"] {
        assert!(!services[name].is_null(), "compose has no {name}");
    }
    let aggregator = &services["aggregator"];
    assert!(aggregator["deploy"]["replicas"].as_u64().expect("replicas") >= 2);
    assert!(
        aggregator["ports"].is_null(),
        "replicas cannot share host ports"
    );
    let args = strings(&aggregator["command"]);
    for flag in args.iter().filter_map(|a| a.strip_prefix("--")) {
        assert!(
            known.iter().any(|k| k == flag),
            "tcpkit-aggregator has no --{flag}"
        );
    }
    let store = args
        .windows(2)
        .find(|w| w[0] == "--store")
        .map(|w| w[1].clone())
        .expect("--store");
    assert!(store.starts_with("clickhouse://clickhouse:"));
    assert!(Spec::parse(&store).is_ok());
    let agent = strings(&services["agent"]["command"]);
    assert!(agent
        .windows(2)
        .any(|w| w == ["--aggregator", "http://aggregator:50051"]));
}
